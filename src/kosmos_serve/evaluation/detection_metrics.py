"""The detection benchmark's figures, from its predictions lines (`detection.detection_record`) and ground truth.

- COCOeval (pycocotools, bbox): AP (IoU 0.50:0.95), AP50 and recall (AR@100) over the images scored, once with the
  boxes' scores and once with every box scored 1.0 (the same boxes; ties keep the order they were written in).
- AUROC of the score, present phrases against absent ones: a phrase's score is the highest score of its boxes, 0
  when it got none; the chance that a present phrase outscores an absent one (ties count half).
- A threshold table: for each `min_score`, the share of absent phrases that keep a box, and the share of present
  objects found (a box of the object's category, scored `min_score` or more, at IoU >= 0.5), also against the
  share found with no threshold.
- With masks (`evaluate --segmenter`): each present object's mask IoU, from the box that found it (the
  best-scored of its category's boxes at IoU >= 0.5), their mean and the share at IoU >= 0.5; and COCOeval (segm)
  AP, AP50 and AR@100 of the masks, each scored with its box's score.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

from kosmos_serve.evaluation.metrics import IOU_THRESHOLD
from kosmos_serve.grounding import best_match

THRESHOLDS = tuple(round(0.1 * step, 1) for step in range(10))  # 0.0, 0.1, ..., 0.9


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """The area under the ROC curve: how often a positive outscores a negative (ties half); None without both.

    Computed from ranks (Mann-Whitney U), ties given their average rank.

    >>> auroc([0.9, 0.8], [0.1, 0.85])
    0.75
    >>> auroc([1.0, 0.5], [0.5, 0.0]), auroc([0.2], [0.2]), auroc([0.3], [])
    (0.875, 0.5, None)
    """
    if not positives or not negatives:
        return None
    labelled = sorted([(float(s), 1) for s in positives] + [(float(s), 0) for s in negatives])
    rank_sum, start = 0.0, 0
    while start < len(labelled):
        end = start
        while end < len(labelled) and labelled[end][0] == labelled[start][0]:
            end += 1
        average_rank = (start + 1 + end) / 2  # ranks start .. end-1, counted from 1
        rank_sum += average_rank * sum(label for _, label in labelled[start:end])
        start = end
    count = len(positives)
    return (rank_sum - count * (count + 1) / 2) / (count * len(negatives))


def phrase_scores(records: list[dict]) -> tuple[list[float], list[float]]:
    """The score of every present and of every absent phrase asked (its highest box score, 0 without a box)."""
    present, absent = [], []
    for record in records:
        for item in record["asked"]:
            if item["present"] is not None:
                (present if item["present"] else absent).append(max(item["scores"], default=0.0))
    return present, absent


def object_scores(records: list[dict]) -> list[float | None]:
    """Per present object (true box), the highest score among its category's boxes at IoU >= 0.5 (None: none)."""
    found = []
    for record in records:
        by_category: dict[int, tuple[list, list, list]] = {}
        for item in record["asked"]:
            truth, boxes, scores = by_category.setdefault(item["category_id"], ([], [], []))
            truth[:] = item["truth"]  # the same for every phrase of a category
            boxes += item["boxes"]
            scores += item["scores"]
        for truth, boxes, scores in by_category.values():
            for true_box in truth:
                index = best_match(true_box, boxes, scores, IOU_THRESHOLD)
                found.append(None if index is None else scores[index])
    return found


def object_mask_ious(records: list[dict]) -> list[float | None]:
    """Per present object, the IoU of its true mask with the mask of the box that found it (None: none did)."""
    ious = []
    for record in records:
        by_category = {item["category_id"]: item["mask_ious"] for item in record["asked"]}  # one per category
        ious += [value for values in by_category.values() for value in values]
    return ious


@dataclass(frozen=True)
class ThresholdRow:
    """What a `min_score` keeps: absent phrases left with a box, present objects still found (shares, 0..1)."""

    min_score: float
    absent_kept: float | None
    found: float | None
    found_vs_none: float | None  # `found` over the share found with no threshold


def threshold_table(records: list[dict], thresholds: Sequence[float] = THRESHOLDS) -> list[ThresholdRow]:
    """One row per threshold.

    >>> records = [{"asked": [
    ...     {"category_id": 1, "present": True, "truth": [[0, 0, 10, 10]], "boxes": [[0, 0, 10, 10]], "scores": [0.8]},
    ...     {"category_id": 2, "present": False, "truth": [], "boxes": [[5, 5, 9, 9]], "scores": [0.4]}]}]
    >>> [(row.min_score, row.absent_kept, row.found) for row in threshold_table(records, (0.0, 0.5, 0.9))]
    [(0.0, 1.0, 1.0), (0.5, 0.0, 1.0), (0.9, 0.0, 0.0)]
    """
    absent = [max(item["scores"]) for record in records for item in record["asked"]
              if item["present"] is False and item["scores"]]
    absent_total = sum(item["present"] is False for record in records for item in record["asked"])
    objects = object_scores(records)
    found_any = _share(sum(score is not None for score in objects), len(objects))
    rows = []
    for threshold in thresholds:
        found = _share(sum(score is not None and score >= threshold for score in objects), len(objects))
        rows.append(ThresholdRow(threshold, _share(sum(score >= threshold for score in absent), absent_total), found,
                                 found / found_any if found is not None and found_any else None))
    return rows


def _share(count: int, total: int) -> float | None:
    return count / total if total else None


def coco_results(records: list[dict], constant: float | None = None, iou_type: str = "bbox") -> list[dict]:
    """Every box as a COCO result `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}` (or `constant`); for
    `iou_type` segm, its mask instead: `"segmentation": {"size", "counts"}`."""
    results = []
    for record in records:
        for item in record["asked"]:
            shapes = item["masks"] if iou_type == "segm" else item["boxes"]
            for shape, score in zip(shapes, item["scores"]):
                placed = {"segmentation": shape} if iou_type == "segm" else {"bbox": _xywh(shape)}
                results.append({"image_id": record["image_id"], "category_id": item["category_id"], **placed,
                                "score": score if constant is None else constant})
    return results


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1, y1, x2 - x1, y2 - y1]


@dataclass(frozen=True)
class CocoScores:
    """COCOeval's bbox (or segm) figures, 0..1 (None when no category of the images scored has a true box)."""

    ap: float | None
    ap50: float | None
    recall: float | None  # AR@100, all areas


def coco_scores(ground_truth: dict, records: list[dict], constant: float | None = None,
                iou_type: str = "bbox") -> CocoScores:
    """COCOeval (bbox, or `iou_type` segm: the masks) over the images of `records`, with the boxes' scores or a
    `constant` one."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted({record["image_id"] for record in records})
    results = coco_results(records, constant, iou_type)
    if not image_ids:
        return CocoScores(None, None, None)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = {"images": ground_truth["images"], "categories": ground_truth["categories"],
                         "annotations": [dict(a) for a in ground_truth["annotations"]]}
        truth.createIndex()
        if not results:  # loadRes cannot take an empty list: nothing found scores 0 wherever something was there
            scored = set(image_ids)
            has_truth = any(a["image_id"] in scored and not a["iscrowd"] for a in ground_truth["annotations"])
            return CocoScores(0.0, 0.0, 0.0) if has_truth else CocoScores(None, None, None)
        evaluation = COCOeval(truth, truth.loadRes(results), iou_type)
        evaluation.params.imgIds = image_ids
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ap, ap50, recall = (float(evaluation.stats[index]) for index in (0, 1, 8))
    return CocoScores(*(None if value < 0 else value for value in (ap, ap50, recall)))


@dataclass(frozen=True)
class MaskSummary:
    """A split's mask figures: each present object's mask IoU (None: no box found it), and COCOeval (segm)."""

    ious: list[float | None]
    coco: CocoScores

    @property
    def found(self) -> list[float]:
        """The IoUs of the objects found."""
        return [value for value in self.ious if value is not None]

    @property
    def mean(self) -> float | None:
        return sum(self.found) / len(self.found) if self.found else None

    @property
    def share_at_half(self) -> float | None:
        """The share of the objects found whose mask reaches IoU >= 0.5."""
        return _share(sum(value >= IOU_THRESHOLD for value in self.found), len(self.found))


@dataclass(frozen=True)
class DetectionSummary:
    """A split's detection figures (and its masks', when they were scored)."""

    images: int
    present: int
    absent: int
    objects: int
    scored: CocoScores
    constant: CocoScores
    auroc: float | None
    table: list[ThresholdRow]
    masks: MaskSummary | None = None


def summarise(ground_truth: dict, records: list[dict], thresholds: Sequence[float] = THRESHOLDS,
              masks: bool = False) -> DetectionSummary:
    """Every figure of a split's predictions lines (with `masks`, the masks' too)."""
    present, absent = phrase_scores(records)
    return DetectionSummary(
        images=len(records), present=len(present), absent=len(absent), objects=len(object_scores(records)),
        scored=coco_scores(ground_truth, records), constant=coco_scores(ground_truth, records, constant=1.0),
        auroc=auroc(present, absent), table=threshold_table(records, thresholds),
        masks=MaskSummary(object_mask_ious(records), coco_scores(ground_truth, records, iou_type="segm")) if masks
        else None)
