"""benchmarks/mask_overlap.py runs end to end on the tiny models (`--tiny`): both ways of starting the segmenter
measured on the same requests, every result with its masks (the script asserts it), the report's row printed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "mask_overlap.py"


def test_the_mask_overlap_benchmark_runs_on_the_tiny_models():
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--rounds", "1", "--requests", "2",
                           "--new-tokens", "4"], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    row = done.stdout.splitlines()[-1]
    figures = re.fullmatch(r"\| 2 requests with masks, 4 new tokens \| embedding on completion ([\d.]+) s \| "
                           r"embedding started on admission ([\d.]+) s \| ([\d.]+)x \|", row)
    assert figures, row
    before, after, ratio = map(float, figures.groups())
    assert before > 0 and after > 0 and ratio == pytest.approx(before / after, rel=0.3)  # times printed to 10 ms
