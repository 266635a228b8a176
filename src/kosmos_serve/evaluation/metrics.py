"""The grounding benchmarks' metrics, as the original Kosmos-2 evaluation computes them.

Boxes are `(x1, y1, x2, y2)` in the image's own pixels. A prediction is the list of boxes the model
gave the phrase, in the order it wrote them (an unboxed phrase has none, which is a miss: the original
scripts put a 0-area box in its place).

- RefCOCO/+/g (`refcoco/refexp_evaluate.py`, its `k=1`): a hit when the *first* predicted box has
  IoU >= 0.5 with the one true box.
- Flickr30k Entities (`flickr_entities/flickr_entities_evaluate.py`, `merge_boxes=False`): recall@k
  is a hit when *any* of the first k predicted boxes has IoU >= 0.5 with *any* of the phrase's true
  boxes (each box of a phrase is its own target, none merged), counted overall and per entity type.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kosmos_serve.grounding import iou

__all__ = ["IOU_THRESHOLD", "RECALL_KS", "RecallTally", "best_ious", "first_box_hit", "iou", "recall_at_k",
           "xywh_to_xyxy"]

IOU_THRESHOLD = 0.5
RECALL_KS = (1, 5, 10)

Box = Sequence[float]


def xywh_to_xyxy(box: Box) -> tuple[float, float, float, float]:
    """A COCO `[x, y, w, h]` box as `(x1, y1, x2, y2)`.

    >>> xywh_to_xyxy([10, 20, 30, 40])
    (10, 20, 40, 60)
    """
    x, y, w, h = box
    return (x, y, x + w, y + h)


def best_ious(predicted: Sequence[Box], truth: Sequence[Box]) -> list[float]:
    """For each predicted box, its highest IoU with any true box.

    >>> best_ious([(0, 0, 2, 2), (5, 5, 6, 6)], [(1, 0, 3, 2), (0, 0, 2, 2)])
    [1.0, 0.0]
    """
    return [max((iou(p, t) for t in truth), default=0.0) for p in predicted]


def first_box_hit(predicted: Sequence[Box], truth: Box, threshold: float = IOU_THRESHOLD) -> bool:
    """Referring-expression accuracy for one expression: the first predicted box has IoU >= threshold.

    >>> first_box_hit([(0, 0, 10, 10), (50, 50, 60, 60)], (0, 0, 10, 10))
    True
    >>> first_box_hit([], (0, 0, 10, 10))
    False
    """
    return bool(predicted) and iou(predicted[0], truth) >= threshold


def recall_at_k(predicted: Sequence[Box], truth: Sequence[Box], k: int, threshold: float = IOU_THRESHOLD) -> bool:
    """Phrase-grounding recall@k for one phrase: one of the first k predicted boxes meets one of the true boxes.

    >>> recall_at_k([(50, 50, 60, 60), (0, 0, 10, 10)], [(0, 0, 10, 10)], k=1)
    False
    >>> recall_at_k([(50, 50, 60, 60), (0, 0, 10, 10)], [(0, 0, 10, 10)], k=5)
    True
    """
    return any(score >= threshold for score in best_ious(predicted[:k], truth))


@dataclass
class RecallTally:
    """Hits and totals per k and per category ("all" plus each entity type), like the original RecallTracker."""

    ks: tuple[int, ...] = RECALL_KS
    hits: dict[int, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    totals: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, hit_by_k: dict[int, bool], types: Sequence[str] = ()) -> None:
        """Count one phrase: under "all" and under each of its types (a phrase may have several)."""
        for category in ("all", *types):
            self.totals[category] += 1
            for k in self.ks:
                self.hits[k][category] += int(hit_by_k[k])

    def recall(self, k: int, category: str = "all") -> float:
        """Recall@k of a category, 0..1 (0 when it has no phrases)."""
        total = self.totals.get(category, 0)
        return self.hits[k][category] / total if total else 0.0

    def categories(self) -> list[str]:
        """"all", then the entity types seen, in alphabetical order."""
        return ["all", *sorted(c for c in self.totals if c != "all")]
