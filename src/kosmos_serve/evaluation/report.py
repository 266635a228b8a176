"""Each split's figures beside Kosmos-2's published ones, as a table for people.

The detection benchmark has no paper figure: its COCOeval figures, score AUROC and threshold table instead, and
with a segmenter its masks' figures (mean mask IoU of the objects found, COCOeval segm); masks of the true boxes
(`--masks-from-true-boxes`) have the masks' figures alone. The ocr benchmark has none either: its error rates and
line detection (`ocr_metrics.py`).
The paper's zero-shot figures (Kosmos-2, arXiv 2306.14824, Tables 2 and 3; the per-type Flickr30k Entities figures
are those of microsoft/unilm `kosmos-2/evaluation/flickr_entities/README.md`), in percent.
"""

from __future__ import annotations

from pathlib import Path

from kosmos_serve.evaluation.backends import TRUE_BOXES
from kosmos_serve.evaluation.datasets import DETECTION_BENCHMARK, FLICKR_BENCHMARK, OCR_BENCHMARK, image_paths
from kosmos_serve.evaluation.detection_metrics import CocoScores, MaskSummary, summarise
from kosmos_serve.evaluation.metrics import RECALL_KS, RecallTally
from kosmos_serve.evaluation.ocr_metrics import LINE_IOU_THRESHOLD, PageCounts
from kosmos_serve.evaluation.runner import Outcome, SplitResult
from kosmos_serve.generation import DEFAULT_MIN_SCORE

PAPER_ACCURACY = {
    ("refcoco", "val"): 52.32, ("refcoco", "testA"): 57.42, ("refcoco", "testB"): 47.26,
    ("refcoco+", "val"): 45.48, ("refcoco+", "testA"): 50.73, ("refcoco+", "testB"): 42.24,
    ("refcocog", "val"): 60.57, ("refcocog", "test"): 61.65,
}
_TYPES = ("all", "animals", "bodyparts", "clothing", "instruments", "other", "people", "scene", "vehicles")
PAPER_RECALL = {  # split -> k -> entity type -> recall@k
    "val": {1: dict(zip(_TYPES, (77.84, 90.82, 41.40, 70.88, 76.77, 64.71, 88.96, 80.63, 86.69))),
            5: dict(zip(_TYPES, (79.24, 91.59, 42.51, 72.21, 78.71, 66.32, 90.73, 80.76, 86.98))),
            10: dict(zip(_TYPES, (79.26, 91.59, 42.51, 72.21, 78.71, 66.35, 90.74, 80.76, 86.98)))},
    "test": {1: dict(zip(_TYPES, (78.72, 91.70, 40.92, 73.55, 76.54, 65.06, 89.52, 82.21, 91.25))),
             5: dict(zip(_TYPES, (80.11, 92.47, 41.30, 74.37, 77.78, 66.15, 91.92, 82.33, 91.25))),
             10: dict(zip(_TYPES, (80.14, 92.47, 41.30, 74.41, 77.78, 66.15, 91.97, 82.33, 91.25)))},
}
MAX_LISTED = 10
ACCURACY_HEADER = ("benchmark", "split", "acc@0.5", "paper", "scored", "skipped")
RECALL_HEADER = ("benchmark", "split", "entity type", *(name for k in RECALL_KS for name in (f"R@{k}", "paper")),
                 "scored", "skipped")
OCR_HEADER = ("benchmark", "split", "CER %", "WER %", "line P %", "line R %", "line F1 %", "matched CER %", "pages",
              "skipped")
THRESHOLD_HEADER = ("min_score", "absent phrases keeping a box %", "present objects found %", "found vs no threshold %")
COCO_HEADER = ("AP", "AP50", "AR@100")


def recall_tally(records: list[dict]) -> RecallTally:
    """Recall@1/5/10 overall and per entity type over flickr30k prediction lines."""
    tally = RecallTally()
    for record in records:
        tally.add({k: record["recall"][str(k)] for k in RECALL_KS}, record.get("types", ()))
    return tally


def split_rows(result: SplitResult) -> list[tuple]:
    """One split's table rows: accuracy beside the paper's (refexp), or recall@k per entity type (flickr30k)."""
    split, records = result.split, result.records
    counts = (len(records), len(result.skipped))
    if split.benchmark != FLICKR_BENCHMARK:
        accuracy = 100 * sum(r["hit"] for r in records) / len(records) if records else None
        return [(split.benchmark, split.name, accuracy, PAPER_ACCURACY.get((split.benchmark, split.name)), *counts)]
    tally, paper = recall_tally(records), PAPER_RECALL.get(split.name, {})
    rows = []
    for category in tally.categories():
        figures = [(100 * tally.recall(k, category) if records else None, paper.get(k, {}).get(category))
                   for k in RECALL_KS]
        rows.append((split.benchmark, split.name, category, *(v for pair in figures for v in pair),
                     *(counts if category == "all" else (tally.totals[category], ""))))
    return rows


def page_counts(records: list[dict]) -> PageCounts:
    """The counts of ocr prediction lines, summed: the split's pooled figures."""
    return sum((PageCounts(**record["counts"]) for record in records), PageCounts())


def ocr_row(result: SplitResult) -> tuple:
    """An ocr split's row: page CER and WER, the lines' precision, recall and F1, the matched lines' CER (percent)."""
    counts = page_counts(result.records)
    figures = (counts.cer, counts.wer, counts.precision, counts.recall, counts.f1, counts.matched_cer)
    return (result.split.benchmark, result.split.name, *map(_percent, figures), len(result.records),
            len(result.skipped))


def format_table(rows: list[tuple], left: int = 2) -> str:
    """Rows of cells as aligned text columns: the first `left` columns left-aligned, numbers right-aligned.

    >>> print(format_table([("split", "acc@0.5"), ("val", 52.3)], left=1))
    split  acc@0.5
    val      52.30
    """
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_report(outcome: Outcome) -> str:
    """The table of every split beside the paper's figures, then what was skipped and where the predictions are."""
    settings = outcome.settings
    heading = (f"{settings.model} ({outcome.source}): greedy, no_repeat_ngram_size {settings.no_repeat_ngram_size}, "
               f"max_new_tokens {settings.max_new_tokens}; IoU >= 0.5 in the image's pixels")
    lines = [heading, ""]
    if settings.model == TRUE_BOXES:
        lines[0] = (f"masks of the true boxes by the segmenter {settings.segmenter} alone, no Kosmos-2 "
                    f"({outcome.source}); mask IoU in the image's pixels")
        for result in outcome.results:
            lines += true_box_lines(result)
        lines.pop()
    elif any(result.split.benchmark == DETECTION_BENCHMARK for result in outcome.results):
        lines[0] = heading.replace("; IoU", "; task detection, every box with its score (min_score 0) but those a "
                                            "likelier phrase's box overlaps past nms_iou (KOSMOS_NMS_IOU=1: none); IoU")
        for result in outcome.results:
            lines += detection_lines(result, settings.segmenter)
        lines.pop()
    elif any(result.split.benchmark == OCR_BENCHMARK for result in outcome.results):
        lines[0] = heading.replace("; IoU >= 0.5", f"; task ocr; CER and WER of each page's text (its lines in the "
                                   f"order read), lines matched one to one at IoU >= {LINE_IOU_THRESHOLD}")
        lines.append(format_table([OCR_HEADER] + [ocr_row(result) for result in outcome.results]))
    else:
        flickr = any(result.split.benchmark == FLICKR_BENCHMARK for result in outcome.results)
        rows = [RECALL_HEADER if flickr else ACCURACY_HEADER]
        for result in outcome.results:
            rows += split_rows(result)
        lines.append(format_table(rows, left=3 if flickr else 2))
    notes = []
    for result in outcome.results:
        notes += _split_notes(result)
    if outcome.interrupted:
        where = (f" in {outcome.out}; run the same command again to continue where it stopped." if outcome.out
                 else "; give --out to be able to continue a run.")
        notes.append(f"Interrupted: every finished batch is saved{where}")
    seconds = f"{outcome.seconds:.1f} s"
    notes.append(f"Predictions: {outcome.out} ({seconds})." if outcome.out else f"({seconds}; --out FILE keeps every "
                 "prediction, and lets an interrupted run continue.)")
    return "\n".join(lines + [""] + notes)


def detection_lines(result: SplitResult, segmenter: str | None = None) -> list[str]:
    """A detection split's figures: COCOeval with the scores and with every score 1.0, the masks' figures (with a
    `segmenter`), AUROC, the threshold table."""
    split, records = result.split, result.records
    figures = summarise(split.ground_truth, records, masks=segmenter is not None)
    asked = f"{figures.present + figures.absent} phrases asked ({figures.present} present, {figures.absent} absent)"
    heading = (f"{split.benchmark} {split.name}: {figures.images} images scored, {len(result.skipped)} skipped; "
               f"{asked}, {figures.objects} objects")
    lines = [heading, ""]
    coco = [("COCOeval (bbox)", *COCO_HEADER), _coco_row("boxes' scores", figures.scored),
            _coco_row("every score 1.0", figures.constant)]
    lines += [format_table(coco, left=1), ""]
    if figures.masks is not None:
        intro = (f"Masks by the segmenter {segmenter}, each true object's from the box that found it (the "
                 "best-scored of its category's at IoU >= 0.5):")
        segm = [("COCOeval (segm)", *COCO_HEADER), _coco_row("boxes' scores", figures.masks.coco)]
        lines += [intro, _mask_line(figures.masks), format_table(segm, left=1), ""]
    auroc = "-" if figures.auroc is None else f"{figures.auroc:.3f}"
    lines += [f"Score AUROC, present against absent phrases: {auroc}", ""]
    table = [THRESHOLD_HEADER] + [
        (f"{row.min_score:.2f}", _percent(row.absent_kept), _percent(row.found), _percent(row.found_vs_none))
        for row in figures.table]
    default = (f"(Detection's built-in default min_score is {DEFAULT_MIN_SCORE}; a model's kosmos_serve.json, "
               "KOSMOS_MIN_SCORE or a request's min_score sets another.)")
    lines += [format_table(table, left=1), default, ""]
    return lines


def true_box_lines(result: SplitResult) -> list[str]:
    """A detection split's masks of the true boxes: each object's mask IoU, and COCOeval (segm) with the masks'
    own scores."""
    split, records = result.split, result.records
    figures = summarise(split.ground_truth, records, masks=True).masks
    heading = (f"{split.benchmark} {split.name}: {len(records)} images scored, {len(result.skipped)} skipped; "
               f"{len(figures.ious)} objects")
    coco = [("COCOeval (segm)", *COCO_HEADER), _coco_row("the masks' own scores", figures.coco)]
    return [heading, "", _mask_line(figures), format_table(coco, left=1), ""]


def _mask_line(figures: MaskSummary) -> str:
    """`40 of 52 objects found; mean mask IoU 0.812, IoU >= 0.5: 97.5%`."""
    found = f"{len(figures.found)} of {len(figures.ious)} objects found"
    if figures.mean is None:
        return f"{found}; no mask scored"
    return f"{found}; mean mask IoU {figures.mean:.3f}, IoU >= 0.5: {100 * figures.share_at_half:.1f}%"


def _coco_row(label: str, scores: CocoScores) -> tuple:
    return (label, *(_percent(value) for value in (scores.ap, scores.ap50, scores.recall)))


def _percent(share: float | None) -> float | None:
    return None if share is None else 100 * share


def _split_notes(result: SplitResult) -> list[str]:
    split, notes = result.split, []
    label = f"{split.benchmark} {split.name}"
    if len(split.examples) < split.available and split.benchmark in (DETECTION_BENCHMARK, OCR_BENCHMARK):
        notes.append(f"{label}: a sample of {len(split.examples)} of {split.available} images (--limit).")
    elif len(split.examples) < split.available:
        notes.append(f"{label}: a sample of {len(split.examples)} of {split.available} examples (--limit); the paper's "
                     "figure is over all of them.")
    if "mergedGT" in split.annotations.name:
        notes.append(f"{label}: a mergedGT file scores against each phrase's boxes merged into one; the paper's "
                     "protocol keeps them apart (final_flickr_separateGT_*.json).")
    if result.resumed:
        notes.append(f"{label}: {result.resumed} predictions taken from the earlier run in the --out file.")
    if split.benchmark == FLICKR_BENCHMARK and result.records and not any(r.get("types") for r in result.records):
        notes.append(f"{label}: recall per entity type needs --flickr-entities (the official Flickr30k Entities "
                     "folder).")
    if result.skipped:
        images = list(dict.fromkeys(reason for _, reason in result.skipped))
        listed = "; ".join(images[:MAX_LISTED])
        if len(images) > MAX_LISTED:
            listed += f"; and {len(images) - MAX_LISTED} more"
        notes.append(f"{label}: {len(result.skipped)} examples skipped, not scored ({len(images)} images): {listed}.")
        if not result.records:
            notes.append(f"{label}: {no_image_found(split.images, result.skipped[0][0].file_name)}")
    return notes


def no_image_found(images: Path, file_name: str) -> str:
    """Where the first image was looked for, and what --images should be, when none of a split's images was found."""
    paths = image_paths(images, file_name)
    folder = Path(file_name).parent
    wanted = (f"the folder that {file_name} is relative to, or the {folder.as_posix()}/ folder in it" if folder.parts
              else f"the folder that holds {file_name}")
    if paths[0] != images / file_name:  # a COCO 2014 name: its train2014/ or val2014/ is looked in first
        wanted += f", or the one with {paths[0].parent.name}/ in it"
    return (f"no image was found under --images {images}; the first, {file_name}, was looked for at "
            f"{' and '.join(map(str, paths))}. --images should be {wanted}.")
