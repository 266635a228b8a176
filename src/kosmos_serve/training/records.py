"""Grounded training data: a JSONL record format and its conversion into training examples.

One JSON object per line; blank lines are skipped. `image` is a path relative to the JSONL file's
folder (or absolute). A box is `[x1, y1, x2, y2]` in pixels of the image as a viewer sees it (EXIF
rotation applied), or in 0..1 when the record says `"box_units": "normalized"`. `task` is
`caption` (the default), `referring` or `region`:

    {"image": "a.png", "caption": "An image of a red circle.",
     "spans": [{"start": 12, "end": 24, "boxes": [[10, 20, 90, 100]]}]}
    -> prompt `<grounding>`, target ` An image of<phrase> a red circle</phrase><object>...</object>.`
    {"image": "a.png", "task": "referring", "expression": "the red circle", "boxes": [[10, 20, 90, 100]]}
    -> prompt `<grounding><phrase> the red circle</phrase>`, target `<object>...</object>`
    {"image": "a.png", "task": "region", "boxes": [[10, 20, 90, 100]], "description": "a red circle"}
    -> prompt `<grounding><phrase> It</phrase><object>...</object> is`, target ` a red circle`

A record (or a caption's span) may give `masks` beside `boxes`, one per box: the object's true mask as COCO
run-length encoding (`{"size": [height, width], "counts": "..."}`, in the pixels of the image as a viewer sees
it), as `kosmos-serve data shapes` writes them. Training does not read them; `evaluate --segmenter` scores the
segmenter's masks against them.

GRIT's own records (those with `noun_chunks`) are read as they are: boxes normalised unless
`box_units` says otherwise, the image is `image` or else `<key>.jpg` beside the JSONL file; the noun
chunks make one caption example (chunks on one span share it) and each of `ref_exps` a referring one.
Targets carry no end-of-sequence token: the trainer appends it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers.models.kosmos2.processing_kosmos2 import coordinate_to_patch_index

from kosmos_serve.errors import KosmosServeError
from kosmos_serve.exports.masks import as_mask, mask_problem
from kosmos_serve.grounding import Mask, NormalisedBox, to_normalised_box
from kosmos_serve.images import open_lazily

GROUNDING_TAG = "<grounding>"
MULTI_OBJECT_DELIMITER = "</delimiter_of_multi_objects/>"
PATCHES_PER_SIDE = 32
IGNORE_INDEX = -100  # the label of a position that is not learnt (and of a patch target that is absent)
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # width and height swap when these are applied
PIXELS, NORMALIZED = "pixels", "normalized"
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class TrueMask:
    """An object's true mask, with the words that name it and its box in pixels (as a viewer sees the image)."""

    phrase: str
    box: tuple[float, float, float, float]
    mask: Mask


@dataclass(frozen=True)
class Example:
    """One training example: an image, the text the model is given (no loss) and the text it must write; and the
    true masks of the boxes in it, when its record gives them (`evaluate --segmenter`)."""

    image_path: Path
    prompt: str
    target: str
    kind: str  # "caption" | "referring" | "region"
    masks: tuple[TrueMask, ...] = ()


class DataError(KosmosServeError):
    """Training data is malformed; the message names each bad record and what is wrong with it."""

    status = 422
    code = "invalid_data"


class BadRecord(ValueError):
    """One record cannot be used; the message says why (collected into one DataError)."""


def read_examples(path: str | Path) -> list[Example]:
    """All examples of a JSONL file; bad records raise one DataError naming each bad line and its fault."""
    path = Path(path).absolute()
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"Cannot read training data {path}: {error}") from error
    records = RecordReader(path.parent)
    examples, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            examples.extend(records.examples(line))
        except BadRecord as problem:
            problems.append(f"{path.name} line {number}: {problem}")
    if problems:
        unlisted = len(problems) - MAX_LISTED_PROBLEMS
        listed = problems[:MAX_LISTED_PROBLEMS] + ([f"... and {unlisted} more"] if unlisted > 0 else [])
        raise DataError(f"{len(problems)} bad record(s) in {path}; fix or remove them:\n" + "\n".join(listed))
    if not examples:
        raise DataError(f"{path} holds no records.")
    return examples


def box_tokens(boxes: Sequence[NormalisedBox]) -> str:
    """`<object><patch_index_a><patch_index_b></delimiter_of_multi_objects/>...</object>` for normalised boxes

    >>> box_tokens([(0.125, 0.25, 0.375, 0.75)])
    '<object><patch_index_0260><patch_index_0747></object>'
    """
    if not boxes:
        raise ValueError("an <object> needs at least one box")
    pairs = (coordinate_to_patch_index(tuple(box), PATCHES_PER_SIDE) for box in boxes)
    joined = MULTI_OBJECT_DELIMITER.join(f"<patch_index_{a:04d}><patch_index_{b:04d}>" for a, b in pairs)
    return f"<object>{joined}</object>"


def grounded_caption(caption: str, spans: Sequence[tuple[int, int, Sequence[NormalisedBox]]]) -> str:
    """The caption in Kosmos-2's format: each span in <phrase>..</phrase>, then its <object> tokens.

    The space before a phrase goes inside its tag, as the model writes it:

    >>> grounded_caption("An image of a red circle.", [(12, 24, [(0.125, 0.25, 0.375, 0.75)])])
    'An image of<phrase> a red circle</phrase><object><patch_index_0260><patch_index_0747></object>.'
    """
    pieces, cursor = [], 0
    for start, end, boxes in sorted(spans, key=lambda span: span[0]):
        if not 0 <= start < end <= len(caption):
            raise ValueError(f"span {start}..{end} is empty or outside the caption (length {len(caption)})")
        if start < cursor:
            raise ValueError(f"span {start}..{end} overlaps the span before it")
        phrase = caption[start:end]
        if phrase != phrase.strip():
            raise ValueError(f"span {start}..{end} ({phrase!r}) starts or ends with whitespace")
        if start > cursor and caption[start - 1] == " ":
            start -= 1
        pieces += [caption[cursor:start], "<phrase>", caption[start:end], "</phrase>", box_tokens(boxes)]
        cursor = end
    pieces.append(caption[cursor:])
    return "".join(pieces)


class RecordReader:
    """Turns JSONL lines into examples; image paths resolve against `folder`, image sizes are cached."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.sizes: dict[Path, tuple[int, int]] = {}

    def examples(self, line: str) -> list[Example]:
        """The examples of one record, or BadRecord saying what is wrong with it."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BadRecord(f"invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise BadRecord("a record must be a JSON object")
        if "noun_chunks" in record:
            return self.grit_examples(record)
        task = record.get("task", "caption")
        if task not in ("caption", "referring", "region"):
            raise BadRecord(f"unknown task {task!r}; use caption, referring or region")
        image = self.image_path(record)
        read_boxes = self.box_reader(record, image, PIXELS)
        read_masks = self.mask_reader(record, image)
        if task == "caption":
            spans = record.get("spans")
            if not isinstance(spans, list) or not all(isinstance(span, dict) for span in spans):
                raise BadRecord('field "spans" must be a list of {"start", "end", "boxes"} objects')
            spans = [(index(s.get("start")), index(s.get("end")), read_boxes(s.get("boxes")), s) for s in spans]
            caption = required_text(record, "caption")
            example = caption_example(image, caption, [span[:3] for span in spans])
            masks = tuple(mask for start, end, _, span in spans for mask in read_masks(caption[start:end], span))
            return [dataclasses.replace(example, masks=masks)]
        if task == "referring":
            expression = required_text(record, "expression")
            example = referring_example(image, expression, read_boxes(record.get("boxes")))
            return [dataclasses.replace(example, masks=read_masks(expression.strip(), record))]
        prompt = f"{GROUNDING_TAG}<phrase> It</phrase>{box_tokens(read_boxes(record.get('boxes')))} is"
        description = required_text(record, "description").strip()
        return [Example(image, prompt, " " + description, "region", read_masks(description, record))]

    def grit_examples(self, record: dict) -> list[Example]:
        """A GRIT record: one caption example from its noun chunks, one referring example per ref_exp."""
        caption = required_text(record, "caption")
        image = self.image_path(record, default=f"{record['key']}.jpg" if "key" in record else None)
        read_boxes = self.box_reader(record, image, NORMALIZED)
        chunk_boxes: dict[tuple[int, int], list[NormalisedBox]] = {}
        for start, end, box in grit_items(record, "noun_chunks"):
            chunk_boxes.setdefault((start, end), []).extend(read_boxes([box]))
        examples = [caption_example(image, caption, [(s, e, boxes) for (s, e), boxes in chunk_boxes.items()])]
        for start, end, box in grit_items(record, "ref_exps"):
            if not caption[start:end].strip():
                raise BadRecord(f"ref_exp span {start}..{end} is empty or outside the caption")
            examples.append(referring_example(image, caption[start:end], read_boxes([box])))
        return examples

    def image_path(self, record: dict, default: str | None = None) -> Path:
        """The image file a record names, which must exist."""
        name = record.get("image", default)
        if not isinstance(name, str) or not name.strip():
            raise BadRecord("missing field 'image' (a path to the image file)")
        path = self.folder / name
        if not path.is_file():
            raise BadRecord(f"image {name} not found (looked for {path})")
        return path

    def box_reader(self, record: dict, image: Path, default_units: str):
        """A function that checks a list of the record's boxes and returns them normalised."""
        units = record.get("box_units", default_units)
        if units not in (PIXELS, NORMALIZED):
            raise BadRecord(f"box_units {units!r} is unknown; use {PIXELS!r} or {NORMALIZED!r}")
        width, height = self.viewed_size(image) if units == PIXELS else (1, 1)

        def read_boxes(boxes: object) -> list[NormalisedBox]:
            if not isinstance(boxes, list) or not boxes:
                raise BadRecord('field "boxes" must be a non-empty list of [x1, y1, x2, y2] boxes')
            return [to_normalised_box(checked_box(box, width, height, units), width, height) for box in boxes]

        return read_boxes

    def mask_reader(self, record: dict, image: Path):
        """A function that checks the masks a record (or a span of it) gives its boxes, which read_boxes has
        checked, and returns each with its phrase and box in pixels (none when it gives no masks)."""
        normalised = record.get("box_units", PIXELS) == NORMALIZED

        def read_masks(phrase: str, holder: dict) -> tuple[TrueMask, ...]:
            masks, boxes = holder.get("masks"), holder["boxes"]
            if masks is None:
                return ()
            width, height = self.viewed_size(image)
            scale = (width, height) if normalised else (1, 1)
            if not isinstance(masks, list) or len(masks) != len(boxes):
                raise BadRecord('field "masks" must be a list of one mask per box')
            for mask in masks:
                problem = mask_problem(mask, height, width)
                if problem is not None:
                    raise BadRecord(f"mask {json.dumps(mask)[:80]}: {problem}")
            return tuple(TrueMask(phrase, (x1 * scale[0], y1 * scale[1], x2 * scale[0], y2 * scale[1]), as_mask(mask))
                         for (x1, y1, x2, y2), mask in zip(boxes, masks))

        return read_masks

    def viewed_size(self, image: Path) -> tuple[int, int]:
        """Width and height of the image as a viewer sees it (EXIF rotation applied), from its header."""
        if image not in self.sizes:
            try:
                with open_lazily(image) as opened:
                    width, height = opened.size
                    orientation = opened.getexif().get(EXIF_ORIENTATION)
            except KosmosServeError as error:
                raise BadRecord(f"image {image}: {error.message}") from None
            self.sizes[image] = (height, width) if orientation in ROTATED_ORIENTATIONS else (width, height)
        return self.sizes[image]


def caption_example(image: Path, caption: str, spans: list) -> Example:
    """A caption example; its target starts with a space, continuing `<grounding>` as the model writes it."""
    try:
        target = grounded_caption(caption, spans)
    except ValueError as error:
        raise BadRecord(str(error)) from None
    target = target.replace("<phrase>", "<phrase> ", 1) if target.startswith("<phrase>") else " " + target
    return Example(image, GROUNDING_TAG, target, "caption")


def referring_example(image: Path, expression: str, boxes: list[NormalisedBox]) -> Example:
    """A referring-expression example: the phrase is given, its boxes are the target."""
    prompt = f"{GROUNDING_TAG}<phrase> {expression.strip()}</phrase>"
    return Example(image, prompt, box_tokens(boxes), "referring")


def required_text(record: dict, field: str) -> str:
    """The record's non-empty text `field`, free of the `<`/`>` that Kosmos-2 keeps for its tags."""
    if field not in record:
        raise BadRecord(f"missing field {field!r}")
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"field {field!r} must be non-empty text")
    if "<" in value or ">" in value:
        raise BadRecord(f"field {field!r} contains '<' or '>', which Kosmos-2 reserves for its tags")
    return value


def index(value: object) -> int:
    """A span's start or end character index."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRecord(f"a span's start and end must be integer character offsets; got {json.dumps(value)}")
    return value


def checked_box(box: object, width: float, height: float, units: str) -> list[float]:
    """`box` if it is four finite numbers, x2 > x1, y2 > y1, inside the image (0..1 when normalised)."""
    numbers = isinstance(box, list) and all(type(v) in (int, float) and math.isfinite(v) for v in box)
    if not (numbers and len(box) == 4):  # type(), not isinstance(): JSON's true/false are not numbers
        raise BadRecord(f"box {json.dumps(box)} is not four finite numbers [x1, y1, x2, y2]")
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise BadRecord(f"box {json.dumps(box)} is inverted or empty (it needs x2 > x1 and y2 > y1)")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        frame = f"the {width}x{height} image" if units == PIXELS else "0..1 (normalised units)"
        raise BadRecord(f"box {json.dumps(box)} lies outside {frame}")
    return box


def grit_items(record: dict, field: str) -> list[tuple[int, int, list]]:
    """GRIT's `[start, end, x_min, y_min, x_max, y_max, confidence]` items as (start, end, box)."""
    items = record.get(field, [])
    if not (isinstance(items, list) and all(isinstance(i, list) and len(i) in (6, 7) for i in items)):
        raise BadRecord(f"field {field!r} must be a list of [start, end, x_min, y_min, x_max, y_max, score]")
    return [(index(item[0]), index(item[1]), item[2:6]) for item in items]
