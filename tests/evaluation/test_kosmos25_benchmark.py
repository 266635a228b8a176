"""benchmarks/kosmos25.py runs end to end on the tiny Kosmos-2.5 (`--tiny`): every configuration measured, every
request run to its token budget, the report's table written."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "kosmos25.py"


def test_the_kosmos25_benchmark_runs_on_the_tiny_model(tmp_path):
    report, raw = tmp_path / "report.md", tmp_path / "raw.json"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--new-tokens", "6", "--clients", "2", "--out", str(report),
                    "--json", str(raw)], check=True, capture_output=True, text=True, env=env, timeout=600)
    numbers = json.loads(raw.read_text())
    rows = {row["config"]: row for row in numbers["rows"]}
    assert list(rows) == ["reference", "none", "auto"]
    assert all(row["new_tokens"] == 6 for row in rows.values())  # end-of-sequence suppressed on both sides
    assert rows["none"]["clients_new_tokens"] == rows["auto"]["clients_new_tokens"] == [6, 6]
    assert rows["none"]["weight_formats"] == {"vision": "float32", "text": "float32"}
    assert all(row["request_s"] > row["first_token_s"] > 0 and row["peak_rss_gib"] > 0 for row in rows.values())
    assert numbers["machine"]["cpu"] and numbers["machine"]["load_before"]
    table = report.read_text()
    assert "| reference | float32 / float32 |" in table and "| auto |" in table and "`<ocr>`, 6 new tokens" in table
