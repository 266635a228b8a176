"""Annotation records -> the labelled pixel boxes of each image, as every export reads them.

- a failed record (one with `error`) is left out and counted;
- each pixel box of each entity is one object, labelled with the entity's `class` when the record
  has one (an ontology), else with its `phrase`, and scored with its own entry of the entity's `scores`
  (records written before boxes had scores count each box 1.0, as the model's answer, and are counted);
  its mask and the segmenter's score for it come along when the record has masks (`annotate --masks`);
- each line a model read (records of `annotate --task ocr`, Kosmos-2.5) is one object too, labelled LINE_LABEL,
  with its text, its box and its box's four corners, scored with its `score` (records without line scores count
  each line 1.0, and are counted);
- a box whose corners came back reversed (the model may write the lower-right location first) is
  put in order, per axis, and counted; a box of zero width or height is left out and counted;
- when several records name the same image (`resolved`), the last one counts (a later run's answer);
- images are sorted by their name relative to one folder (`relative_to`, by default the images'
  common folder), so the same records give the same file whatever order they were written in.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.exports.masks import as_mask, mask_problem
from kosmos_serve.grounding import Mask

PixelBox = tuple[float, float, float, float]
LINE_LABEL = "Text"  # the label of a line read: what Label Studio's OCR template calls printed text
UNSCORED = 1.0  # the score of a box from a record written before scores (what the ML backend gave every box then)


@dataclass(frozen=True)
class LabelledBox:
    """One object of an image: its label (class, else phrase), the phrase the model wrote, x1, y1, x2, y2 pixels
    and the model's score for the box (0 to 1); its mask and the segmenter's score for that, when it has one."""

    label: str
    phrase: str
    xyxy: PixelBox
    score: float
    mask: Mask | None = None
    mask_score: float | None = None


@dataclass(frozen=True)
class ReadLine:
    """One line of text a model read: its text, x1, y1, x2, y2 pixels, its box's four corners (x, y) clockwise from
    the top left, and the model's score for it (0 to 1)."""

    text: str
    xyxy: PixelBox
    corners: tuple[tuple[float, float], ...]
    score: float


@dataclass(frozen=True)
class AnnotatedImage:
    """One annotated image as the exports see it: `name` is its path relative to the export's folder (POSIX)."""

    name: str
    resolved: str
    width: int
    height: int
    model: str
    quantize: str  # the engine's weight setting ("none" in records that do not say)
    boxes: tuple[LabelledBox, ...]
    lines: tuple[ReadLine, ...] = ()  # the lines read, for records of task ocr
    text: str = ""  # the record's text and markdown (for ocr: the reading without boxes, and each line linked)
    markdown: str = ""


@dataclass
class ExportReport:
    """What an export kept and what it left out or changed, for the one-line summary."""

    format: str = ""
    out: str = ""
    label_config: str = ""  # label-studio's labeling config, when one was written too
    images: int = 0
    boxes: int = 0
    lines: int = 0  # lines read (records of task ocr)
    masks: int = 0  # boxes that came with a mask
    masks_not_exported: int = 0  # of those, the ones the format chosen leaves as boxes only
    empty_masks: int = 0  # boxes left out of brush or polygon regions: their mask has no pixel
    root: str = ""
    failed: Counter = field(default_factory=Counter)  # error code -> records left out
    reordered_boxes: int = 0
    empty_boxes: int = 0
    unscored_boxes: int = 0
    unscored_lines: int = 0
    replaced_records: int = 0
    torn_last_line: bool = False

    def summary(self) -> str:
        """E.g. `wrote out.json (coco): 2 images, 4 boxes, image names relative to /data; left out 1 failed ...`.

        >>> ExportReport("label-studio", "tasks.json", "config.xml", images=1, boxes=2, root="/data").summary()
        'wrote tasks.json (label-studio) and its labeling config config.xml: 1 image, 2 boxes, image names relative to /data'
        """
        written = f"{self.out} ({self.format})" + (f" and its labeling config {self.label_config}"
                                                   if self.label_config else "")
        line = (f"wrote {written}: {self.images} image{'s' * (self.images != 1)}, "
                f"{self.boxes} box{'es' * (self.boxes != 1)}{f' ({self.masks} with masks)' if self.masks else ''}, "
                + (f"{self.lines} line{'s' * (self.lines != 1)}, " if self.lines else "")
                + f"image names relative to {self.root or '-'}")
        notes = []
        if self.failed:
            codes = ", ".join(f"{code} {count}" for code, count in sorted(self.failed.items()))
            total = sum(self.failed.values())
            notes.append(f"left out {total} failed record{'s' * (total != 1)} ({codes})")
        if self.reordered_boxes:
            notes.append(f"put {self.reordered_boxes} box{'es' * (self.reordered_boxes != 1)} with reversed corners "
                         "in order")
        if self.empty_boxes:
            notes.append(f"left out {self.empty_boxes} box{'es' * (self.empty_boxes != 1)} of zero width or height")
        if self.masks_not_exported:
            notes.append(f"exported {self.masks_not_exported} masked box{'es' * (self.masks_not_exported != 1)} as "
                         "boxes only (--mask-format brush or polygon exports their masks)")
        if self.empty_masks:
            notes.append(f"left out {self.empty_masks} box{'es' * (self.empty_masks != 1)} whose mask is empty "
                         "(no pixel to draw)")
        if self.unscored_boxes:
            notes.append(f"scored {self.unscored_boxes} box{'es' * (self.unscored_boxes != 1)} {UNSCORED} "
                         "(records written before scores)")
        if self.unscored_lines:
            notes.append(f"scored {self.unscored_lines} line{'s' * (self.unscored_lines != 1)} {UNSCORED} (the records "
                         "carry no line scores)")
        if self.replaced_records:
            notes.append(f"{self.replaced_records} image{'s' * (self.replaced_records != 1)} had several records "
                         "(the last one counts)")
        if self.torn_last_line:
            notes.append("left out an incomplete last line (a run still writing, or interrupted)")
        return line + ("; " + "; ".join(notes) if notes else "")


def order_box(box: Sequence[float]) -> tuple[PixelBox | None, bool]:
    """`(x1, y1, x2, y2)` with x1 <= x2 and y1 <= y2, and whether it had to be reordered; None if it has no area.

    >>> order_box([130, 88, 20, 10])
    ((20, 10, 130, 88), True)
    >>> order_box([20, 10, 130, 88])
    ((20, 10, 130, 88), False)
    >>> order_box([20, 40, 20, 10])
    (None, True)
    """
    x1, y1, x2, y2 = box
    ordered = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    reversed_corners = x1 > x2 or y1 > y2
    if ordered[0] == ordered[2] or ordered[1] == ordered[3]:
        return None, reversed_corners
    return ordered, reversed_corners


def read_records(path: str | Path, report: ExportReport | None = None) -> list[dict]:
    """The records of a JSONL file, checked; the first bad line raises InvalidRequestError naming it.

    An incomplete last line (no newline, not JSON: a run still writing or interrupted) is left out
    and noted in `report`.
    """
    path = Path(path)
    records, problems = [], []
    try:
        with path.open(encoding="utf-8", newline="") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    if not line.endswith("\n"):  # only the last line can lack its newline
                        if report is not None:
                            report.torn_last_line = True
                        continue
                    problems.append((number, f"invalid JSON ({error.msg} at column {error.colno})"))
                    continue
                problem = record_problem(record)
                if problem:
                    problems.append((number, problem))
                else:
                    records.append(record)
    except FileNotFoundError:
        raise InvalidRequestError(f"{path} does not exist; give the JSONL file kosmos-serve annotate wrote.") from None
    except IsADirectoryError:
        raise InvalidRequestError(f"{path} is a folder; give the JSONL file kosmos-serve annotate wrote.") from None
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{path} is not a text file of annotation records (JSON lines).") from None
    except OSError as error:
        raise InvalidRequestError(f"cannot read {path}: {error.strerror}.") from None
    if problems:
        number, problem = problems[0]
        more = f" ({len(problems)} bad lines in all)" if len(problems) > 1 else ""
        raise InvalidRequestError(f"{path} line {number} is not an annotation record: {problem}{more}.")
    if not records:
        raise InvalidRequestError(f"{path} holds no annotation records.")
    return records


def record_problem(record) -> str | None:
    """What makes `record` not an annotation record (annotated or failed), or None when it is one."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, where a record is an object with path, width, height and entities"
    for key in ("path", "resolved"):
        if not isinstance(record.get(key), str):
            return f"field {key!r} is missing or not text"
    if record.get("error") is not None:
        error = record["error"]
        if not isinstance(error, dict) or not isinstance(error.get("code"), str):
            return "field 'error' must be an object with 'code' and 'message'"
        return None
    for key in ("width", "height"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return f"field {key!r} is missing or not a positive whole number of pixels"
    if not isinstance(record.get("entities"), list):
        return "field 'entities' is missing or not a list"
    for number, entity in enumerate(record["entities"]):
        problem = entity_problem(entity, record["width"], record["height"])
        if problem:
            return f"entity {number}: {problem}"
    lines = record.get("lines", [])
    if not isinstance(lines, list):
        return "field 'lines' is not a list"
    for number, line in enumerate(lines):
        problem = line_problem(line, record["width"], record["height"])
        if problem:
            return f"line {number}: {problem}"
    return None


def line_problem(line, width: int | None = None, height: int | None = None) -> str | None:
    """What is wrong with one line read (its text, its box and the box's four corners, inside a `width` x `height`
    image if given, and a score from 0 to 1 when it has one), or None.

    >>> line_problem({"text": "TOTAL", "corners": [[0, 0], [9, 0], [9, 5], [0, 5]], "box": [0, 0, 9, 50]}, 20, 10)
    'box [0, 0, 9, 50] lies outside the 20x10 image'
    """
    if not isinstance(line, dict) or not isinstance(line.get("text"), str):
        return "must be an object with a 'text'"
    box, corners = line.get("box"), line.get("corners")
    if not _is_point_list(box, 4, 1):
        return f"box {box!r} is not [x1, y1, x2, y2]"
    if not _is_point_list(corners, 4, 2):
        return f"corners {corners!r} are not four [x, y] points"
    for name, points in (("box", [box[:2], box[2:]]), ("corners", corners)):
        if width is not None and not all(0 <= x <= width and 0 <= y <= height for x, y in points):
            return f"{name} {line[name]} lies outside the {width}x{height} image"
    score = line.get("score")
    if score is not None and not (_is_number(score) and 0 <= score <= 1):
        return "'score' must be a number from 0 to 1"
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_point_list(value, count: int, size: int) -> bool:
    """Whether `value` is `count` numbers (`size` 1) or `count` lists of `size` numbers."""
    if not (isinstance(value, list) and len(value) == count):
        return False
    if size == 1:
        return all(_is_number(v) for v in value)
    return all(isinstance(point, list) and len(point) == size and all(_is_number(v) for v in point) for point in value)


def entity_problem(entity, width: int | None = None, height: int | None = None) -> str | None:
    """What is wrong with one entity (phrase, class, pixel boxes inside a `width` x `height` image if given, a score
    from 0 to 1 per box, and when it has masks a mask of the image's size and a mask score per box), or None.

    >>> entity_problem({"phrase": "a dog", "pixel_boxes": [[0, 0, 2, 2]], "scores": [0.7, 0.2]})
    "'scores' must hold one number from 0 to 1 per pixel box"
    """
    if not isinstance(entity, dict) or not isinstance(entity.get("phrase"), str):
        return "must be an object with a 'phrase'"
    if entity.get("class") is not None and not isinstance(entity["class"], str):
        return "'class' must be text or null"
    boxes = entity.get("pixel_boxes")
    if not isinstance(boxes, list):
        return "'pixel_boxes' is missing or not a list"
    for box in boxes:
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            return f"pixel box {box!r} is not [x1, y1, x2, y2]"
        if width is not None and not (0 <= min(box[0], box[2]) and max(box[0], box[2]) <= width
                and 0 <= min(box[1], box[3]) and max(box[1], box[3]) <= height):
            return f"pixel box {box} lies outside the {width}x{height} image"
    scores = entity.get("scores") or []  # none (or empty): a record from before scores
    if scores and not (isinstance(scores, list) and len(scores) == len(boxes) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in scores)):
        return "'scores' must hold one number from 0 to 1 per pixel box"
    masks, mask_scores = entity.get("masks") or [], entity.get("mask_scores") or []
    if not masks and not mask_scores:
        return None
    if not (isinstance(masks, list) and len(masks) == len(boxes)):
        return "'masks' must hold one mask per pixel box"
    if not (isinstance(mask_scores, list) and len(mask_scores) == len(boxes) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in mask_scores)):
        return "'mask_scores' must hold one number per pixel box"
    for number, mask in enumerate(masks):
        if problem := mask_problem(mask, height, width):
            return f"mask {number} {problem}"
    return None


def entity_boxes(entities: Iterable, class_map: Mapping[str, str] | None = None,
                 report: ExportReport | None = None) -> list[LabelledBox]:
    """Each entity's pixel boxes in order, labelled and scored; `entities` are record dicts or engine entities.

    The label is the entity's `class` (records from an ontology), else `class_map[phrase]`, else the phrase;
    each box keeps its own score (UNSCORED when the entity has no scores), and its mask and mask score when it has
    them.

    >>> [(box.label, box.score) for box in entity_boxes([{"phrase": "a car", "class": "car",
    ...     "pixel_boxes": [[0, 0, 5, 5], [5, 5, 9, 9]], "scores": [0.9, 0.4]}])]
    [('car', 0.9), ('car', 0.4)]
    """
    labelled = []
    for entity in entities:
        if isinstance(entity, Mapping):
            phrase, given_class, boxes = entity["phrase"], entity.get("class"), entity["pixel_boxes"]
            scores = entity.get("scores") or ()
            masks = [as_mask(mask) for mask in entity.get("masks") or ()]
            mask_scores = entity.get("mask_scores") or ()
        else:  # the engine's
            phrase, given_class, boxes, scores = entity.phrase, None, entity.pixel_boxes, entity.scores
            masks, mask_scores = entity.masks, entity.mask_scores
        label = given_class or (class_map or {}).get(phrase, phrase)
        for number, (box, score) in enumerate(zip(boxes, scores or [UNSCORED] * len(boxes), strict=True)):
            ordered, reversed_corners = order_box(box)
            if report is not None:
                report.empty_boxes += ordered is None
                report.reordered_boxes += ordered is not None and reversed_corners
                report.unscored_boxes += ordered is not None and not scores
            if ordered is not None:
                mask, mask_score = (masks[number], mask_scores[number]) if masks else (None, None)
                labelled.append(LabelledBox(label, phrase, ordered, score, mask, mask_score))
    return labelled


def record_lines(lines: Iterable[Mapping], report: ExportReport | None = None) -> list[ReadLine]:
    """The lines of a record, each scored with its `score` (UNSCORED when it has none, counted in `report`); boxes
    with reversed corners are put in order and those of zero size left out, as entities' boxes are (and counted).

    >>> [(line.text, line.xyxy, line.score) for line in record_lines([{"text": "TOTAL", "box": [9, 0, 2, 5],
    ...     "corners": [[9, 0], [2, 0], [2, 5], [9, 5]]}])]
    [('TOTAL', (2, 0, 9, 5), 1.0)]
    """
    read = []
    for line in lines:
        ordered, reversed_corners = order_box(line["box"])
        score = line.get("score")
        if report is not None:
            report.empty_boxes += ordered is None
            report.reordered_boxes += ordered is not None and reversed_corners
            report.unscored_lines += ordered is not None and score is None
        if ordered is not None:
            corners = tuple(tuple(corner) for corner in line["corners"])
            read.append(ReadLine(line["text"], ordered, corners, UNSCORED if score is None else score))
    return read


def annotated_images(records: Iterable[dict], relative_to: str | Path | None = None,
                     report: ExportReport | None = None) -> list[AnnotatedImage]:
    """The annotated images of `records`, sorted by name; failed records are left out and counted in `report`."""
    report = report if report is not None else ExportReport()
    latest: dict[str, dict] = {}
    for record in records:
        report.replaced_records += record["resolved"] in latest
        latest[record["resolved"]] = record  # the last record of an image counts
    kept = []
    for record in latest.values():
        if record.get("error") is not None:
            report.failed[record["error"]["code"]] += 1
        else:
            kept.append(record)
    root = Path(relative_to).absolute() if relative_to else common_folder(r["resolved"] for r in kept)
    report.root = str(root) if root else ""
    images = [
        AnnotatedImage(name=relative_name(record["resolved"], root), resolved=record["resolved"],
                       width=record["width"], height=record["height"], model=str(record.get("model", "")),
                       quantize=str(record.get("quantize") or "none"),
                       boxes=tuple(entity_boxes(record["entities"], report=report)),
                       lines=tuple(record_lines(record.get("lines", []), report)),
                       text=record.get("text") or "", markdown=record.get("markdown") or "")
        for record in kept
    ]
    images.sort(key=lambda image: image.name)
    report.images, report.boxes = len(images), sum(len(image.boxes) for image in images)
    report.lines = sum(len(image.lines) for image in images)
    report.masks = sum(box.mask is not None for image in images for box in image.boxes)
    return images


def common_folder(paths: Iterable[str]) -> Path | None:
    """The deepest folder that holds every file of `paths` (absolute), or None for no paths.

    >>> str(common_folder(["/data/a/x.png", "/data/b/y.png"]))
    '/data'
    """
    folders = [os.path.dirname(os.path.abspath(path)) for path in paths]
    return Path(os.path.commonpath(folders)) if folders else None


def relative_name(resolved: str, root: Path) -> str:
    """`resolved` relative to `root`, with forward slashes; InvalidRequestError if it lies outside `root`."""
    for path, folder in ((Path(os.path.abspath(resolved)), root), (Path(resolved).resolve(), root.resolve())):
        if path.is_relative_to(folder):  # as written, else with symlinks resolved on both sides
            return path.relative_to(folder).as_posix()
    raise InvalidRequestError(f"image {resolved} is not under {root}; give a --relative-to folder that holds every "
                              "image.")
