"""Grounding accuracy of a model on held-out examples, through the serving engine itself.

- referring: the first box generated for the expression has IoU >= 0.5 with the true box;
- caption: share of true objects that the brief caption (`<grounding> An image of`) names with the
  same phrase and a box at IoU >= 0.5;
- region: the description generated for a box equals the true one;
- with a segmenter (`evaluate --segmenter`) and records that give true masks: the mask of each true object of
  the referring and caption examples whose box the model found (of the boxes it gave the object's phrase, the
  best-scored one at IoU >= 0.5, as the detection benchmark matches boxes), scored by its IoU with the true
  mask; or, to measure the segmenter alone, the mask of each object's true box (`true_box_masks`).

Decoding is greedy. By default without the original demo's no-repeat-3-gram rule (the engine's
serving default): a caption of several objects repeats 3-grams such as `</object> , <phrase>`, so
under that rule 103 of 200 held-out scenes' true captions, holding 68% of their objects, cannot
be generated at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

from kosmos_serve.engine import Engine, GenerationParams, Request, Segmenter
from kosmos_serve.exports.masks import mask_iou
from kosmos_serve.grounding import best_match, iou
from kosmos_serve.images import image_digest, load_image
from kosmos_serve.tasks import Task, TaskInput
from kosmos_serve.training.records import Example, TrueMask

IOU_THRESHOLD = 0.5
PLAIN_GREEDY = 0  # no_repeat_ngram_size that scores the model itself: no n-gram is forbidden


@dataclass(frozen=True)
class Score:
    """Hits out of a total, for one kind of example."""

    hits: int = 0
    total: int = 0

    @property
    def rate(self) -> float:
        """Hits / total (0 when there is nothing to score)."""
        return self.hits / self.total if self.total else 0.0

    def __add__(self, other: Score) -> Score:
        return Score(self.hits + other.hits, self.total + other.total)

    def describe(self) -> str:
        """`87.5% (175/200)`."""
        return f"{self.rate:.1%} ({self.hits}/{self.total})"


@dataclass(frozen=True)
class MaskScore:
    """The mask IoU of each true object whose box was found, out of the objects with a true mask."""

    ious: tuple[float, ...] = ()
    objects: int = 0

    def __add__(self, other: MaskScore) -> MaskScore:
        return MaskScore(self.ious + other.ious, self.objects + other.objects)

    def describe(self) -> str:
        """`mean IoU 0.812 over 40 of 52 objects; IoU>=0.5: 97.5%`.

        >>> MaskScore((0.9, 0.4), 3).describe()
        'mean IoU 0.650 over 2 of 3 objects; IoU>=0.5: 50.0%'
        """
        if not self.ious:
            return f"no mask scored (0 of {self.objects} objects found)"
        mean, hits = sum(self.ious) / len(self.ious), sum(value >= IOU_THRESHOLD for value in self.ious)
        return (f"mean IoU {mean:.3f} over {len(self.ious)} of {self.objects} objects; IoU>=0.5: "
                f"{hits / len(self.ious):.1%}")


def true_entities(example: Example) -> list[tuple[str, list]]:
    """(phrase, normalised boxes) pairs written in an example's prompt and target."""
    _, entities = clean_text_and_extract_entities_with_bboxes(example.prompt + example.target)
    return [(name.lower(), boxes) for name, _, boxes in entities]


def _request(example: Example, image, no_repeat_ngram_size: int, masks: bool) -> Request:
    params = GenerationParams(max_new_tokens=64, no_repeat_ngram_size=no_repeat_ngram_size, masks=masks)
    if example.kind == "caption":
        return Request(image, TaskInput(Task.CAPTION), params)
    return Request(image, TaskInput(Task.RAW, prompt=example.prompt, grounding=False), params)


def _score(example: Example, result) -> Score:
    truth = true_entities(example)
    predicted = [(entity.phrase.lower(), entity.boxes) for entity in result.entities]
    if example.kind == "region":
        return Score(int(result.answer.strip() == example.target.strip()), 1)
    if example.kind == "referring":
        phrase, boxes = truth[0]
        guess = next((b for p, b in predicted if p == phrase), None)
        return Score(int(bool(guess) and iou(guess[0], boxes[0]) >= IOU_THRESHOLD), 1)
    hits = 0
    for phrase, boxes in truth:
        if any(p == phrase and any(iou(g, boxes[0]) >= IOU_THRESHOLD for g in guess) for p, guess in predicted):
            hits += 1
    return Score(hits, len(truth))


def _mask_score(example: Example, result) -> MaskScore:
    """The mask IoU of each of the example's true objects whose box the result found (see the module's doc)."""
    width, height = result.image_size
    ious = []
    for truth in example.masks:
        mine = [(box, score, mask) for entity in result.entities if entity.phrase.lower() == truth.phrase.lower()
                for box, score, mask in zip(entity.boxes, entity.scores, entity.masks)]
        pixels = [(x1 * width, y1 * height, x2 * width, y2 * height) for (x1, y1, x2, y2), _, _ in mine]
        found = best_match(truth.box, pixels, [score for _, score, _ in mine], IOU_THRESHOLD)
        if found is not None:
            ious.append(mask_iou(mine[found][2], truth.mask))
    return MaskScore(tuple(ious), len(example.masks))


def evaluate(engine: Engine, examples: Sequence[Example], batch_size: int = 32,
             no_repeat_ngram_size: int = PLAIN_GREEDY) -> dict[str, Score | MaskScore]:
    """Scores per example kind, running the engine in batches (greedy, forbidding repeated n-grams of that size);
    with the engine's segmenter, also the masks of the referring and caption examples' objects ("referring masks",
    "caption masks"), where their records give true masks."""
    scores: dict[str, Score | MaskScore] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        masked = [engine.segmenter is not None and bool(example.masks) and example.kind != "region"
                  for example in chunk]
        requests = [_request(example, load_image(example.image_path), no_repeat_ngram_size, masks)
                    for example, masks in zip(chunk, masked)]
        for example, masks, result in zip(chunk, masked, engine.run(requests)):
            scores[example.kind] = scores.get(example.kind, Score()) + _score(example, result)
            if masks:
                kind = f"{example.kind} masks"
                scores[kind] = scores.get(kind, MaskScore()) + _mask_score(example, result)
    return scores


def true_box_masks(segmenter: Segmenter, examples: Sequence[Example]) -> MaskScore:
    """The segmenter alone: the mask of each object with a true mask (once, however many examples hold it), from
    its true box, scored by its IoU with the true mask; an image's boxes go through one decoder call."""
    objects: dict[Path, dict[tuple, TrueMask]] = {}
    for example in examples:
        for truth in example.masks:
            objects.setdefault(example.image_path, {}).setdefault(truth.box, truth)
    ious = []
    for path, truths in objects.items():
        image = load_image(path)
        segmented = segmenter.segment(image, image_digest(image), list(truths))
        ious += [mask_iou(mask, truth.mask) for (mask, _), truth in zip(segmented, truths.values())]
    return MaskScore(tuple(ious), len(ious))


SCORE_NAMES = {
    "referring": "referring expressions, box at IoU>=0.5",
    "caption": "objects named with a box at IoU>=0.5 in the brief caption",
    "region": "region descriptions exactly right",
    "referring masks": "masks of the referring expressions' objects, from the boxes found",
    "caption masks": "masks of the brief caption's objects, from the boxes found",
    "true boxes": "masks from the true boxes (the segmenter alone)",
}


def format_scores(scores: dict[str, Score | MaskScore]) -> str:
    """One line per kind: `referring: 87.5% (175/200)`."""
    return "\n".join(f"{SCORE_NAMES.get(kind, kind)}: {score.describe()}" for kind, score in sorted(scores.items()))
