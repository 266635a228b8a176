"""`kosmos-serve predict --task ocr --draw` on the tiny Kosmos-2.5: each line read drawn where it is, with its text.

A random model writes no lines: the engine's parser is handed a written reading (through the production parser)."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from PIL import Image

from kosmos_serve.cli import main
from kosmos_serve.engine.families import Kosmos25Family
from kosmos_serve.ocr import parse_reading, resized_size


def test_draw_outlines_each_line_and_writes_its_text(tmp_path, tiny_kosmos25_dir, monkeypatch):
    page = Image.new("RGB", (500, 240), "white")
    page.save(tmp_path / "page.png")
    resized_width, resized_height = resized_size(*page.size)
    reading = (f"<ocr><bbox><x_30><y_30><x_{resized_width // 2}><y_{resized_height // 4}></bbox>SUB TOTAL\n"
               f"<bbox><x_30><y_{resized_height // 2}><x_{resized_width - 30}><y_{resized_height - 50}></bbox>"
               "TOTAL 50,000\n")
    monkeypatch.setattr(Kosmos25Family, "parse",
                        lambda self, processor, decoded, spec, size: parse_reading(reading, spec.text, *size))
    monkeypatch.setenv("KOSMOS_THREADS", "1")
    threads = torch.get_num_threads()
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "page.png"), "--model", str(tiny_kosmos25_dir),
                                       "--task", "ocr", "--max-new-tokens", "2", "--draw", str(tmp_path / "drawn.png")],
                                catch_exceptions=False)
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    lines = parse_reading(reading, "<ocr>", *page.size).lines
    for line, printed in zip(lines, result.stdout.splitlines()[-2:], strict=True):  # box, its score, its text
        assert printed.startswith(f"  - {list(line.box)} score ") and printed.endswith(f" {line.text}")
    drawn = Image.open(tmp_path / "drawn.png").convert("RGB")
    for line in lines:
        x1, y1, x2, y2 = line.box
        assert all(drawn.getpixel(corner) != (255, 255, 255) for corner in line.corners)
        assert drawn.crop((x1 + 3, y1 + 3, x2 - 2, y2 - 2)).convert("L").getextrema()[0] < 100
    assert drawn.getpixel((2, 2)) == drawn.getpixel((497, 237)) == (255, 255, 255)
