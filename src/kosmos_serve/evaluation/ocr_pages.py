"""OCR ground truth: a JSONL file of each image's text lines and their boxes, read as pages that Kosmos-2.5 reads with
its `ocr` task; and a page's predictions line, scored by `ocr_metrics.py`.

The file holds one JSON object per line, one per image (`kosmos-serve data pages` writes such a file):

    {"image": "scans/0001.png", "lines": [{"text": "Total 50,000", "box": [24, 872, 827, 921]}, ...]}

- "image": the image's file name, relative to the --images folder; each image once.
- "lines": the page's lines in reading order, each its "text" and its "box" [x1, y1, x2, y2] in pixels of the image
  as stored (no EXIF rotation applied: the model is shown those pixels), or instead of a box its four "corners"
  [[x, y], ...] (the rectangle that encloses them is scored). A page without text has "lines": [].
Other fields ("width", "height", a line's "corners" beside its "box", ...) are read past.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from kosmos_serve.evaluation.backends import Generation
from kosmos_serve.evaluation.datasets import (
    OCR_BENCHMARK,
    AnnotationFormatError,
    Split,
    check_split_files,
    find_image,
    require,
    sample,
)
from kosmos_serve.evaluation.ocr_metrics import Line, score_page
from kosmos_serve.tasks import Task, TaskInput

EXPECTED_PAGES = (
    'expected OCR ground truth: JSON lines, one object per image, its "image" (the file name, relative to --images) '
    'and its "lines" in reading order, each a "text" and a "box" [x1, y1, x2, y2] in pixels (or four "corners" '
    "[[x, y], ...])"
)


@dataclass(frozen=True)
class PageExample:
    """One image to read and its true lines, (text, (x1, y1, x2, y2)) in reading order."""

    key: str  # the image's name in the file
    file_name: str
    image_path: Path
    truth: tuple[Line, ...]

    def task_input(self) -> TaskInput:
        """What the model is asked: task ocr (Kosmos-2.5's `<ocr>`: every line with its box)."""
        return TaskInput(Task.OCR)


def read_ocr_splits(annotations: list[Path], images: Path, limit: int | None = None) -> list[Split]:
    """Every ground-truth file read and checked (before any model is loaded), each sampled to `limit` pages."""
    check_split_files(annotations, images)
    splits = []
    for path in annotations:
        examples = read_pages(path, images)
        splits.append(Split(OCR_BENCHMARK, path, images, sample(examples, limit), len(examples)))
    return splits


def read_pages(path: Path, images: Path) -> list[PageExample]:
    """The pages of an OCR ground-truth file, in file order."""
    if not path.is_file():
        raise AnnotationFormatError(f"--annotations {path} is not a file; {EXPECTED_PAGES}.")
    examples, seen = [], set()
    with open(path, encoding="utf-8") as file:
        for number, text in enumerate(file, start=1):
            if not text.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(text)
            except ValueError:
                raise AnnotationFormatError(f"{where} is not JSON; {EXPECTED_PAGES}.") from None
            require(isinstance(record, dict) and isinstance(record.get("image"), str) and record["image"].strip(),
                     f'{where} has no "image" file name; {EXPECTED_PAGES}.')
            require(record["image"] not in seen, f"{where}: image {record['image']!r} is given twice.")
            seen.add(record["image"])
            lines = record.get("lines")
            require(isinstance(lines, list), f'{where} has no "lines" list; {EXPECTED_PAGES}.')
            truth = tuple(_line(line, f"{where}, lines[{index}]") for index, line in enumerate(lines))
            examples.append(PageExample(record["image"], record["image"], find_image(images, record["image"]), truth))
    return examples


def _line(line, where: str) -> Line:
    """A true line as (text, box): its box, or the rectangle enclosing its corners."""
    require(isinstance(line, dict) and isinstance(line.get("text"), str), f'{where} has no "text"; {EXPECTED_PAGES}.')
    if "box" in line:
        box = line["box"]
        require(isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)
                 and box[0] <= box[2] and box[1] <= box[3],
                 f'{where}: "box" is not [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2; {EXPECTED_PAGES}.')
        return line["text"], tuple(box)
    corners = line.get("corners")
    require(isinstance(corners, list) and len(corners) == 4
             and all(isinstance(c, list) and len(c) == 2 and all(_is_number(v) for v in c) for c in corners),
             f'{where} has no "box" [x1, y1, x2, y2] nor four "corners" [[x, y], ...]; {EXPECTED_PAGES}.')
    xs, ys = [x for x, _ in corners], [y for _, y in corners]
    return line["text"], (min(xs), min(ys), max(xs), max(ys))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ocr_record(split: Split, example: PageExample, generation: Generation, settings) -> dict:
    """The predictions line of one page: the lines read and the true ones, their matches and the page's counts."""
    counts, matches = score_page(generation.lines, example.truth)
    return {"benchmark": split.benchmark, "annotations": split.annotations.name, "split": split.name,
            "key": example.key, "image": example.file_name, "raw_text": generation.raw_text,
            "lines": [_line_dict(line) for line in generation.lines],
            "truth": [_line_dict(line) for line in example.truth],
            "matches": [[predicted, true, round(overlap, 4)] for predicted, true, overlap in matches],
            "counts": counts.as_dict(), **settings.as_dict()}


def _line_dict(line: Line) -> dict:
    text, box = line
    return {"text": text, "box": list(box)}
