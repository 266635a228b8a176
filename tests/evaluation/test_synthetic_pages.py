"""Synthetic text pages (`kosmos-serve data pages`): deterministic, every line's box the tight rectangle of its ink,
and read back by the OCR evaluation as its ground truth."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFont

from kosmos_serve.cli import main
from kosmos_serve.evaluation.ocr_pages import read_pages
from kosmos_serve.grounding import iou
from kosmos_serve.training.pages import FONTS, FONTS_DIR, VOCABULARY, load_font, write_pages_dataset

PAGES = 30


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """30 pages (seed 0): the folder and its records."""
    path = write_pages_dataset(tmp_path_factory.mktemp("pages"), PAGES, seed=0)
    return path.parent, [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_seed_writes_identical_bytes_in_another_process_and_another_seed_differs(tmp_path):
    first = write_pages_dataset(tmp_path / "a", 5, seed=3)
    program = ("import sys; from kosmos_serve.training.pages import write_pages_dataset; "
               "write_pages_dataset(sys.argv[1], 5, 3)")
    subprocess.run([sys.executable, "-c", program, str(tmp_path / "b")], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "12345"})
    other = write_pages_dataset(tmp_path / "c", 5, seed=4)
    assert first.read_bytes() == (tmp_path / "b/pages.jsonl").read_bytes() != other.read_bytes()
    for name in ("000000.png", "000004.png"):
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()
        assert (tmp_path / "a/images" / name).read_bytes() != (tmp_path / "c/images" / name).read_bytes()


def test_the_fonts_are_the_shipped_ones_with_their_license_laid_out_without_libraqm():
    assert (FONTS_DIR / "LICENSE").read_text().startswith("Fonts are (c) Bitstream")
    for name in FONTS:
        font = load_font(name, 20)
        assert font.path == str(FONTS_DIR / f"{name}.ttf") and font.layout_engine == ImageFont.Layout.BASIC


def test_every_box_is_the_tight_rectangle_of_its_lines_ink(pages):
    folder, records = pages
    for record in records:
        image = np.asarray(Image.open(folder / record["image"]).convert("RGB")).astype(int)
        assert image.shape == (record["height"], record["width"], 3)
        ink = (image != image[0, 0]).any(axis=2)  # a plain background: every other pixel is ink
        inside = np.zeros_like(ink)
        for line in record["lines"]:
            x1, y1, x2, y2 = line["box"]
            assert line["corners"] == [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]
            assert 0 <= x1 < x2 <= record["width"] and 0 <= y1 < y2 <= record["height"]
            box = ink[y1:y2, x1:x2]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()  # tight on each side
            inside[y1:y2, x1:x2] = True
        assert not (ink & ~inside).any(), f"{record['image']} has ink outside its lines' boxes"
        boxes = [line["box"] for line in record["lines"]]
        assert all(iou(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_pages_vary_in_size_font_and_layout_and_read_in_column_order(pages):
    _, records = pages
    assert len({(r["width"], r["height"]) for r in records}) == PAGES
    assert {r["font"] for r in records} == set(FONTS) and len({r["font_size"] for r in records}) >= 4
    assert {r["columns"] for r in records} == {1, 2}
    assert all(3 <= len(r["lines"]) <= 16 for r in records)
    assert all(word in VOCABULARY for r in records for line in r["lines"] for word in line["text"].split(" "))
    for record in records:
        lefts = [line["box"][0] for line in record["lines"]]
        tops = [line["box"][1] for line in record["lines"]]
        column_starts = [i for i in range(1, len(tops)) if tops[i] < tops[i - 1]]
        assert len(column_starts) == record["columns"] - 1  # top to bottom, then the next column from its top
        if column_starts:
            assert min(lefts[column_starts[0]:]) > max(line["box"][2] for line in record["lines"][:column_starts[0]])
    widths = [line["box"][2] - line["box"][0] for r in records if r["columns"] == 1 for line in r["lines"]]
    assert min(widths) < 0.3 * max(widths)  # lines of varied lengths


def test_the_evaluation_reads_the_pages_as_ground_truth(pages):
    folder, records = pages
    examples = read_pages(folder / "pages.jsonl", folder)
    assert [e.key for e in examples] == [r["image"] for r in records]
    assert all(e.image_path == folder / r["image"] and e.image_path.is_file() for e, r in zip(examples, records))
    assert [list(e.truth) for e in examples] == [[(line["text"], tuple(line["box"])) for line in r["lines"]]
                                                 for r in records]


def test_the_command_writes_the_pages(tmp_path):
    result = CliRunner().invoke(main, ["data", "pages", "--n", "2", "--seed", "5", "--out", str(tmp_path)])
    assert result.exit_code == 0 and result.output == f"{tmp_path / 'pages.jsonl'}\n"
    assert sorted(path.name for path in (tmp_path / "images").iterdir()) == ["000000.png", "000001.png"]
