"""Generated text -> clean text, entities with normalised and pixel boxes, markdown.

The parsing itself is transformers' own (`clean_text_and_extract_entities_with_bboxes`, the code
behind `Kosmos2Processor.post_process_generation`), so text and entities are the reference's.
This module adds what the reference lacks: boxes in the image's own pixels, the prompt's words
split off, and a markdown rendering where every grounded span links to its boxes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from kosmos_serve.errors import ModelLoadError

# transformers' parser is imported where it is called: importing transformers takes seconds, and tasks, which the
# command line's --help reads, needs only this module's boxes.

NormalisedBox = tuple[float, float, float, float]
PixelBox = tuple[int, int, int, int]

IMAGE_END_TAG = "</image>"


@dataclass(frozen=True)
class Mask:
    """One object's mask as COCO run-length encoding (pycocotools' compressed `counts`, as text), in pixels of
    the original image as a viewer sees it (EXIF orientation applied); `size` is (height, width), as COCO's."""

    size: tuple[int, int]
    counts: str

    def to_dict(self) -> dict:
        """`{"size": [h, w], "counts": "..."}`, what pycocotools' `mask.decode` and COCO files take.

        >>> Mask((2, 3), "0:1").to_dict()
        {'size': [2, 3], 'counts': '0:1'}
        """
        return {"size": list(self.size), "counts": self.counts}

    @classmethod
    def from_array(cls, pixels) -> Mask:
        """The mask of a (height, width) array, true where the object is (pycocotools' `mask.encode`).

        >>> import numpy as np
        >>> Mask.from_array(np.array([[0, 1, 1], [0, 1, 0]], dtype=bool))
        Mask(size=(2, 3), counts='231')
        """
        import numpy as np

        encoded = _coco_mask().encode(np.asfortranarray(np.asarray(pixels, dtype=np.uint8)))
        return cls((int(encoded["size"][0]), int(encoded["size"][1])), encoded["counts"].decode("ascii"))

    def to_array(self):
        """The mask as a (height, width) boolean array (pycocotools' `mask.decode`).

        >>> Mask((2, 3), "231").to_array().astype(int).tolist()
        [[0, 1, 1], [0, 1, 0]]
        """
        return _coco_mask().decode({"size": list(self.size), "counts": self.counts.encode("ascii")}).astype(bool)


def _coco_mask():
    """pycocotools' run-length codec (`pycocotools.mask`), or an error saying how to install it."""
    try:
        from pycocotools import mask
    except ImportError:
        raise ModelLoadError("Masks need pycocotools, which is not installed: pip install 'kosmos-serve[masks]'.") from None
    return mask


@dataclass(frozen=True)
class Entity:
    """A phrase of the text grounded to one or more boxes, each with the model's score for it.

    `span` indexes the result's `text`; an `<object>` with no phrase has an empty span and a name
    made of its patch tokens, exactly as transformers names it. `scores` (one per box, in [0, 1];
    `engine/scoring.py` says how they are computed) is empty only before the engine has scored it.
    `masks` and `mask_scores` (the segmenter's own quality score) are one per box when a request asked
    for masks, else empty.
    """

    phrase: str
    span: tuple[int, int]
    boxes: tuple[NormalisedBox, ...]
    pixel_boxes: tuple[PixelBox, ...]
    scores: tuple[float, ...] = ()
    masks: tuple[Mask, ...] = ()
    mask_scores: tuple[float, ...] = ()

    def keeping(self, min_score: float) -> Entity | None:
        """This entity with only its boxes scored `min_score` or more; None when none is left.

        >>> e = Entity("a fire", (12, 18), ((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)), ((0, 0, 2, 2), (2, 2, 4, 4)), (0.9, 0.2))
        >>> e.keeping(0.5).scores, e.keeping(0.5).pixel_boxes, e.keeping(0.95)
        ((0.9,), ((0, 0, 2, 2),), None)
        """
        return self.with_boxes([index for index, score in enumerate(self.scores) if score >= min_score])

    def with_boxes(self, kept: Sequence[int]) -> Entity | None:
        """This entity with only the boxes at the indices `kept` (and their scores and masks); None when none is."""
        if not kept:
            return None
        return dataclasses.replace(self, boxes=tuple(self.boxes[i] for i in kept),
                                   pixel_boxes=tuple(self.pixel_boxes[i] for i in kept),
                                   scores=tuple(self.scores[i] for i in kept),
                                   masks=tuple(self.masks[i] for i in kept if i < len(self.masks)),
                                   mask_scores=tuple(self.mask_scores[i] for i in kept if i < len(self.mask_scores)))

    def as_reference(self) -> tuple[str, tuple[int, int], list[NormalisedBox]]:
        """The tuple `post_process_generation` gives for this entity."""
        return (self.phrase, self.span, list(self.boxes))


@dataclass(frozen=True)
class TextLine:
    """A line of text a model read (Kosmos-2.5's `<ocr>`), its box (x1, y1, x2, y2) in pixels of the image, and how
    sure the model was of both (`engine/line_scoring.py`; 0 until the engine scores it)."""

    text: str
    box: PixelBox
    score: float = 0.0

    @property
    def corners(self) -> tuple[tuple[int, int], ...]:
        """The box's four corners, clockwise from the top left (the order transformers' Kosmos-2.5 doc writes them).

        >>> TextLine("Total 50,000", (24, 872, 827, 921)).corners
        ((24, 872), (827, 872), (827, 921), (24, 921))
        """
        x1, y1, x2, y2 = self.box
        return ((x1, y1), (x2, y1), (x2, y2), (x1, y2))


@dataclass(frozen=True)
class GroundedText:
    """Parsed generation: reference text and entities plus what people need to use them (lines: a page read)."""

    text: str
    answer: str
    raw_text: str
    entities: tuple[Entity, ...]
    markdown: str
    lines: tuple[TextLine, ...] = ()


def to_pixel_box(box: NormalisedBox, width: int, height: int) -> PixelBox:
    """Map a normalised box onto the original image (the processor squash-resizes, so x*W, y*H).

    >>> to_pixel_box((0.390625, 0.046875, 0.984375, 0.828125), 640, 480)
    (250, 22, 630, 397)
    """
    x1, y1, x2, y2 = box
    return (int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height))


def to_normalised_box(box: PixelBox | tuple[float, float, float, float], width: int, height: int) -> NormalisedBox:
    """Map a pixel box of a `width` x `height` image to normalised coordinates.

    >>> to_normalised_box((160, 120, 480, 360), 640, 480)
    (0.25, 0.25, 0.75, 0.75)
    """
    x1, y1, x2, y2 = box
    return (x1 / width, y1 / height, x2 / width, y2 / height)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes.

    >>> iou((0, 0, 2, 2), (1, 0, 3, 2))
    0.3333333333333333
    """
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def suppress_overlaps(entities: Sequence[Entity], max_iou: float) -> tuple[Entity, ...]:
    """Non-maximum suppression across phrases: a box overlapping a higher-scored box of another phrase by more than
    `max_iou` is dropped (an entity left with no box with it); a phrase's own boxes never suppress each other.

    Two phrases that box one region are read as one object claimed twice, and it goes to the phrase the model is
    surer of (`max_iou` 1: nothing dropped).

    >>> car = Entity("a car", (0, 5), ((0, 0, 0.5, 0.5),), ((0, 0, 2, 2),), (0.8,))
    >>> bus = Entity("a bus", (7, 12), ((0, 0, 0.5, 0.4), (0.5, 0.5, 1, 1)), ((0, 0, 2, 2), (2, 2, 4, 4)), (0.3, 0.6))
    >>> [(e.phrase, e.scores) for e in suppress_overlaps([car, bus], 0.5)]
    [('a car', (0.8,)), ('a bus', (0.6,))]
    >>> [(e.phrase, e.scores) for e in suppress_overlaps([car, bus], 1.0)]
    [('a car', (0.8,)), ('a bus', (0.3, 0.6))]
    """
    ranked = sorted(((score, entity_index, box_index) for entity_index, entity in enumerate(entities)
                     for box_index, score in enumerate(entity.scores)), key=lambda item: -item[0])
    kept: list[tuple[int, int]] = []
    for _, entity_index, box_index in ranked:
        box = entities[entity_index].boxes[box_index]
        if all(other == entity_index or iou(box, entities[other].boxes[index]) <= max_iou for other, index in kept):
            kept.append((entity_index, box_index))
    survivors = (entity.with_boxes(sorted(b for e, b in kept if e == index)) if entity.scores else entity
                 for index, entity in enumerate(entities))  # an unscored entity cannot be ranked: kept as it is
    return tuple(survivor for survivor in survivors if survivor is not None)


def best_match(truth: tuple[float, ...], boxes: list[tuple[float, ...]], scores: list[float],
               threshold: float = 0.5) -> int | None:
    """Which of `boxes` finds the true box: the best-scored of those at IoU >= `threshold` with it (the first of
    equals), or None. How the detection benchmark matches, and `evaluate --segmenter` picks the mask to score.

    >>> best_match((0, 0, 10, 10), [(0, 0, 10, 10), (1, 0, 10, 10), (50, 50, 60, 60)], [0.2, 0.7, 0.9])
    1
    >>> best_match((0, 0, 10, 10), [(50, 50, 60, 60)], [0.9]) is None
    True
    """
    found = [index for index, box in enumerate(boxes) if iou(box, truth) >= threshold]
    return max(found, key=lambda index: scores[index], default=None)


def clean_prompt_text(prompt: str) -> str:
    """The words a prompt contributes to the clean text (its tags and location tokens removed).

    >>> clean_prompt_text("<grounding> Question: Where is<phrase> the fire</phrase><object><patch_index_0005><patch_index_0911></object> next to? Answer:")
    'Question: Where is the fire next to? Answer:'
    """
    from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

    text, _ = clean_text_and_extract_entities_with_bboxes(prompt)
    return text


def parse_generation(decoded_text: str, prompt: str, width: int, height: int) -> GroundedText:
    """Parse a decoded generation (the whole sequence, prompt included) the way the reference does.

    `decoded_text` is what `processor.batch_decode(ids, skip_special_tokens=True)` gives; the raw
    text is the part after `</image>` and `text`/`entities` equal `post_process_generation`'s.
    """
    from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

    raw_text = decoded_text.split(IMAGE_END_TAG)[-1]
    text, reference_entities = clean_text_and_extract_entities_with_bboxes(raw_text)
    entities = tuple(
        Entity(
            phrase=name,
            span=tuple(span),
            boxes=tuple(tuple(box) for box in boxes),
            pixel_boxes=tuple(to_pixel_box(box, width, height) for box in boxes),
        )
        for name, span, boxes in reference_entities
    )
    return GroundedText(
        text=text,
        answer=strip_prompt_words(text, clean_prompt_text(prompt)),
        raw_text=raw_text,
        entities=entities,
        markdown=render_markdown(text, entities),
    )


def strip_prompt_words(text: str, prompt_words: str) -> str:
    """`text` without the prompt's own words at its start (unchanged if it does not start with them).

    >>> strip_prompt_words("An image of a snowman.", "An image of")
    'a snowman.'
    """
    if prompt_words and text.startswith(prompt_words):
        return text[len(prompt_words) :].lstrip()
    return text


def render_markdown(text: str, entities: tuple[Entity, ...]) -> str:
    """The paper's link style: each grounded span becomes `[span](#box=x1,y1,x2,y2;...)` in pixels.

    >>> e = Entity("a fire", (12, 18), ((0.0, 0.0, 0.5, 0.5),), ((0, 0, 320, 240),))
    >>> render_markdown("An image of a fire.", (e,))
    'An image of [a fire](#box=0,0,320,240).'
    """
    pieces = []
    cursor = 0
    for entity in sorted(entities, key=lambda e: e.span):
        start, end = entity.span
        if start == end or start < cursor:  # a bare <object> has no words to link
            continue
        boxes = ";".join(",".join(str(v) for v in box) for box in entity.pixel_boxes)
        pieces.append(text[cursor:start])
        pieces.append(f"[{text[start:end]}](#box={boxes})")
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)
