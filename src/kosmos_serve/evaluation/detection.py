"""Detection over COCO-format ground truth: each image asked for its categories' phrases at once (task detection),
every box kept with its score (`min_score` 0), then scored by pycocotools' COCOeval and by how well the scores part
the phrases that are in an image from those that are not (`detection_metrics.py`).

The ground truth is a COCO JSON file: `images` (`id`, `file_name`), `categories` (`id`, `name`) and `annotations`
(`image_id`, `category_id`, `bbox` [x, y, w, h] in the image's stored pixels; `area` and `iscrowd` optional).
- The phrases asked: each category's name (the categories are the ontology), or with an ontology file (the one
  `annotate --ontology` reads: phrase -> class name) the phrases it maps to the category; only the categories it
  names are then asked and scored.
- The categories each image is asked for: every one; or, when the file's images carry LVIS's `neg_category_ids`
  (categories checked absent from that image, as `python -m kosmos_serve.evaluation.synthetic` writes them), the
  categories annotated in the image and its `neg_category_ids` (LVIS's federated protocol).
- A phrase is *present* in an image when its category has an annotation there that is not a crowd, *absent* when
  it has none at all (one with only crowd annotations is neither: COCOeval ignores boxes on crowds).
- Masks (`evaluate --segmenter`): every image then needs its `height` and `width` and every annotation a
  `segmentation` (polygons or run-length encoding, as COCO writes them), read as compressed RLE. Each box asked for
  gets a mask from the segmenter; each true object that a box of its category found (the best-scored at
  IoU >= 0.5, as `detection_metrics.object_scores` matches) gets the IoU of that box's mask with its own.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from kosmos_serve.collections.inputs import read_ontology
from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.evaluation.backends import EvaluationError, Generation
from kosmos_serve.evaluation.datasets import (
    DETECTION_BENCHMARK,
    AnnotationFormatError,
    Split,
    find_image,
    read_coco_file,
    require,
    sample,
)
from kosmos_serve.evaluation.metrics import IOU_THRESHOLD, best_ious, xywh_to_xyxy
from kosmos_serve.exports.masks import as_mask, mask_iou, mask_problem
from kosmos_serve.grounding import Mask, best_match
from kosmos_serve.tasks import Task, TaskInput

Box = tuple[float, float, float, float]

EXPECTED_COCO = (
    'expected COCO-format ground truth: a JSON object with "images" (each an "id" and a "file_name"), "categories" '
    '(each an "id" and a "name": the phrase asked) and "annotations" (each an "image_id", a "category_id" and a '
    '[x, y, w, h] "bbox" in pixels)'
)
MAX_NAMED = 8  # categories named in an error message
EXPECTED_SEGMENTATION = ('a "segmentation" as COCO writes them: polygons [[x1, y1, x2, y2, ...], ...] or run-length '
                         'encoding {"size": [height, width], "counts": ...}')


@dataclass(frozen=True)
class Asked:
    """One phrase an image is asked for: its category, whether the category is there, and its true boxes (pixels)."""

    phrase: str
    category_id: int
    present: bool | None  # None: the category has only crowd annotations in the image
    truth: tuple[Box, ...]  # the category's annotations in the image that are not crowds, (x1, y1, x2, y2)
    masks: tuple[Mask, ...] = ()  # their segmentations, when masks are scored


@dataclass(frozen=True)
class DetectionExample:
    """One image and every phrase it is asked for, in one detection request."""

    key: str  # the image's id, as text
    image_id: int
    file_name: str
    image_path: Path
    asked: tuple[Asked, ...]

    @property
    def phrases(self) -> tuple[str, ...]:
        return tuple(item.phrase for item in self.asked)

    def task_input(self) -> TaskInput:
        """What the model is asked: task detection, one prompt per phrase (`<grounding><phrase> {p}</phrase>`)."""
        return TaskInput(Task.DETECTION, phrases=self.phrases)


def read_detection_splits(annotations: list[Path], images: Path, limit: int | None = None,
                          ontology: Path | None = None, masks: bool = False) -> list[Split]:
    """Every ground-truth file read and checked (before any model is loaded), each sampled to `limit` images; with
    `masks`, their segmentations too."""
    require_pycocotools()
    if not images.is_dir():
        raise InvalidRequestError(f"--images {images} is not a folder; give the folder that holds the images.")
    names = [path.name for path in annotations]
    if len(set(names)) != len(names):
        raise AnnotationFormatError("Two --annotations files have the same name; give each split once.")
    phrases = read_ontology(ontology) if ontology is not None else None
    splits = []
    for path in annotations:
        examples, truth = read_detection(path, images, phrases, ontology, masks)
        splits.append(Split(DETECTION_BENCHMARK, path, images, sample(examples, limit), len(examples), truth))
    return splits


def require_pycocotools() -> None:
    """pycocotools, which scores detection, or an error saying how to install it."""
    try:
        import pycocotools.cocoeval  # noqa: F401
    except ImportError:
        raise InvalidRequestError("--benchmark detection scores with pycocotools' COCOeval, which is not installed: "
                                  'pip install "pycocotools>=2.0.8".') from None


def ground_truth_name(ontology: Path | None) -> str:
    """The `ground_truth` setting of a run: the categories' names, or the ontology file by its content."""
    if ontology is None:
        return "coco"
    return f"coco, ontology {hashlib.sha256(ontology.read_bytes()).hexdigest()[:12]}"


def read_detection(path: Path, images: Path, ontology: dict[str, str] | None = None,
                   ontology_path: Path | None = None, masks: bool = False) -> tuple[list[DetectionExample], dict]:
    """A COCO ground-truth file's images as detection examples, in file order; and the ground truth COCOeval reads
    (the categories asked, their annotations, each with an area and a unique id; with `masks`, its segmentation
    as compressed RLE)."""
    data = read_coco_file(path, EXPECTED_COCO, ("images", "annotations", "categories"))
    categories = _categories(path, data["categories"])
    asked_by_category = _phrases(path, categories, ontology, ontology_path)
    image_ids, entries = set(), data["images"]
    for index, entry in enumerate(entries):
        where = f'{path}: images[{index}]'
        require(_is_id(entry.get("id")) and isinstance(entry.get("file_name"), str) and entry["file_name"].strip(),
                 f'{where} has no integer "id" and "file_name"; {EXPECTED_COCO}.')
        require(entry["id"] not in image_ids, f'{where}: image id {entry["id"]} is given twice.')
        image_ids.add(entry["id"])
        negatives = entry.get("neg_category_ids", [])
        require(isinstance(negatives, list) and all(n in categories for n in negatives),
                 f'{where}: "neg_category_ids" must list category ids of the file.')
        require(not masks or all(_is_id(entry.get(side)) and entry[side] > 0 for side in ("height", "width")),
                f'{where} has no integer "height" and "width": scoring masks (--segmenter) needs each image\'s size.')
    sizes = {entry["id"]: (entry["height"], entry["width"]) for entry in entries} if masks else None
    annotations = _annotations(path, data["annotations"], image_ids, categories, sizes)
    federated = any("neg_category_ids" in entry for entry in entries)

    by_image: dict[int, list[dict]] = {}
    for annotation in annotations:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    examples = []
    for entry in entries:
        found = [a for a in by_image.get(entry["id"], []) if a["category_id"] in asked_by_category]
        wanted = set(asked_by_category)
        if federated:
            wanted = {a["category_id"] for a in found} | (set(entry.get("neg_category_ids", [])) & wanted)
        asked = []
        for category in (c for c in asked_by_category if c in wanted):
            own = [a for a in found if a["category_id"] == category]
            truth = tuple(xywh_to_xyxy(a["bbox"]) for a in own if not a["iscrowd"])
            present = bool(truth) if truth or not own else None
            true_masks = tuple(as_mask(a["segmentation"]) for a in own if not a["iscrowd"] and masks)
            asked += [Asked(phrase, category, present, truth, true_masks) for phrase in asked_by_category[category]]
        examples.append(DetectionExample(str(entry["id"]), entry["id"], entry["file_name"],
                                         find_image(images, entry["file_name"]), tuple(asked)))
    truth = {
        "images": [{"id": entry["id"], "file_name": entry["file_name"]} | _size(entry, masks) for entry in entries],
        "categories": [{"id": c, "name": categories[c]} for c in asked_by_category],
        "annotations": [{**a, "id": number} for number, a in enumerate(
            (a for a in annotations if a["category_id"] in asked_by_category), start=1)],
    }
    return examples, truth


def detection_record(split: Split, example: DetectionExample, generation: Generation, settings) -> dict:
    """The predictions line of one image: per phrase asked, its boxes (pixels), their scores, the true boxes; when the
    run's settings name a segmenter, each box's mask and, per true box, the IoU of the mask of the box that found it
    (None: none did)."""
    found = boxes_by_phrase(generation)
    by_category: dict[int, tuple[list, list, list]] = {}  # a category's boxes, scores and masks, all its phrases'
    for item in example.asked:
        pooled = by_category.setdefault(item.category_id, ([], [], []))
        for kept, more in zip(pooled, found.get(" ".join(item.phrase.split()), ([], [], []))):
            kept += more
    asked = []
    for item in example.asked:
        boxes, scores, masks = found.get(" ".join(item.phrase.split()), ([], [], []))
        line = {"phrase": item.phrase, "category_id": item.category_id, "present": item.present,
                "boxes": [list(box) for box in boxes], "scores": scores,
                "truth": [list(box) for box in item.truth], "iou": best_ious(boxes, item.truth)}
        if settings.segmenter is not None:
            line.update(masks=masks, mask_ious=found_mask_ious(item, *by_category[item.category_id]))
        asked.append(line)
    return {"benchmark": split.benchmark, "annotations": split.annotations.name, "split": split.name,
            "key": example.key, "image_id": example.image_id, "image": example.file_name,
            "raw_text": generation.raw_text, "asked": asked, **settings.as_dict()}


def found_mask_ious(item: Asked, boxes: list[Box], scores: list[float], masks: list[dict]) -> list[float | None]:
    """Per true box of `item`, the IoU of its true mask with the mask of the box that found it, or None."""
    ious = []
    for true_box, true_mask in zip(item.truth, item.masks):
        found = best_match(true_box, boxes, scores, IOU_THRESHOLD)
        ious.append(None if found is None else mask_iou(masks[found], true_mask))
    return ious


def boxes_by_phrase(generation: Generation) -> dict[str, tuple[list[Box], list[float], list[dict]]]:
    """Each entity's boxes in the image's pixels, their scores and their masks (none unless asked), by phrase
    (spaces aside).

    >>> g = Generation("", (("a  cat", ((0.5, 0.5, 1.0, 1.0),)),), (200, 100), ((0.75,),))
    >>> boxes_by_phrase(g)
    {'a cat': ([(100.0, 50.0, 200.0, 100.0)], [0.75], [])}
    """
    width, height = generation.image_size
    found: dict[str, tuple[list[Box], list[float], list[dict]]] = {}
    for index, (name, boxes) in enumerate(generation.entities):
        scores = generation.scores[index] if index < len(generation.scores) else ()
        if len(scores) != len(boxes):
            raise EvaluationError(f"The answer gives {name!r} {len(boxes)} boxes but {len(scores)} scores: the "
                                  "detection benchmark needs a kosmos-serve that scores every box.")
        pixels, kept, masks = found.setdefault(" ".join(name.split()), ([], [], []))
        pixels += [(x1 * width, y1 * height, x2 * width, y2 * height) for x1, y1, x2, y2 in boxes]
        kept += [float(score) for score in scores]
        masks += generation.masks[index] if generation.masks else ()
    return found


def _size(entry: dict, masks: bool) -> dict:
    """An image's height and width, which COCOeval reads to score masks (nothing without masks)."""
    return {"height": entry["height"], "width": entry["width"]} if masks else {}


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _categories(path: Path, listed: list[dict]) -> dict[int, str]:
    """Category id -> name (stripped), in file order."""
    require(bool(listed), f"{path} has no categories: their names are the phrases each image is asked for; "
                           f"{EXPECTED_COCO}.")
    categories: dict[int, str] = {}
    for index, category in enumerate(listed):
        name = category.get("name")
        require(_is_id(category.get("id")) and isinstance(name, str) and bool(name.strip()),
                 f'{path}: categories[{index}] has no integer "id" and non-empty "name"; {EXPECTED_COCO}.')
        require(category["id"] not in categories, f"{path}: category id {category['id']} is given twice.")
        require(name.strip() not in categories.values(), f"{path}: two categories are named {name.strip()!r}.")
        categories[category["id"]] = name.strip()
    return categories


def _phrases(path: Path, categories: dict[int, str], ontology: dict[str, str] | None,
             ontology_path: Path | None) -> dict[int, list[str]]:
    """Category id -> the phrases asked for it (its name, or the ontology's phrases), each phrase valid to ask."""
    if ontology is None:
        asked = {category: [name] for category, name in categories.items()}
    else:
        ids = {name: category for category, name in categories.items()}
        unknown = sorted({name for name in ontology.values() if name not in ids})
        if unknown:
            known = ", ".join(repr(name) for name in list(ids)[:MAX_NAMED]) + ", ..." * (len(ids) > MAX_NAMED)
            raise InvalidRequestError(f"--ontology {ontology_path}: {', '.join(map(repr, unknown))} is no category "
                                      f"of {path} (its categories: {known}).")
        asked = {}
        for phrase, name in ontology.items():
            asked.setdefault(ids[name], []).append(phrase)
        asked = {category: asked[category] for category in categories if category in asked}  # the file's order
    for phrases in asked.values():
        for phrase in phrases:
            if "<" in phrase or ">" in phrase:
                raise InvalidRequestError(f"Phrase {phrase!r} (of {path}'s categories or the ontology) contains '<' "
                                          "or '>', which Kosmos-2 reserves for its tags.")
    return asked


def _annotations(path: Path, listed: list[dict], image_ids: set, categories: dict[int, str],
                 sizes: dict[int, tuple[int, int]] | None = None) -> list[dict]:
    """The annotations checked: known image and category, a finite [x, y, w, h]; an area and iscrowd filled in; with
    the images' `sizes` (height, width), each one's segmentation as compressed RLE."""
    checked = []
    for index, annotation in enumerate(listed):
        where = f"{path}: annotations[{index}]"
        box = annotation.get("bbox")
        require(isinstance(box, list) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
            and box[2] >= 0 and box[3] >= 0, f'{where} has no [x, y, w, h] "bbox" (w, h >= 0); {EXPECTED_COCO}.')
        require(annotation.get("image_id") in image_ids, f"{where}: image_id {annotation.get('image_id')!r} is no "
                                                          "image of the file.")
        require(annotation.get("category_id") in categories,
                 f"{where}: category_id {annotation.get('category_id')!r} is no category of the file.")
        area = annotation.get("area")
        checked.append({"image_id": annotation["image_id"], "category_id": annotation["category_id"], "bbox": box,
                        "area": area if isinstance(area, (int, float)) else box[2] * box[3],
                        "iscrowd": int(bool(annotation.get("iscrowd", 0)))})
        if sizes is not None:
            checked[-1]["segmentation"] = _segmentation(where, annotation.get("segmentation"),
                                                        sizes[annotation["image_id"]])
    return checked


def _segmentation(where: str, segmentation, size: tuple[int, int]) -> dict:
    """An annotation's segmentation as compressed RLE (as pycocotools' `COCO.annToRLE` makes it): polygons and
    uncompressed RLE drawn at the image's size (height, width), compressed RLE checked against it."""
    from pycocotools import mask as coco_mask

    require(segmentation is not None, f'{where} has no "segmentation": scoring masks (--segmenter) needs '
                                      f"{EXPECTED_SEGMENTATION} on every annotation.")
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
        problem = mask_problem(segmentation, *size)
        require(problem is None, f"{where}: its segmentation: {problem}.")
        return {"size": list(segmentation["size"]), "counts": segmentation["counts"]}
    numbers = (int, float)
    polygons = isinstance(segmentation, list) and bool(segmentation) and all(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(isinstance(v, numbers) for v in p)
        for p in segmentation)
    counts = segmentation.get("counts") if isinstance(segmentation, dict) else None
    uncompressed = (isinstance(counts, list) and all(isinstance(v, int) and v >= 0 for v in counts)
                    and sum(counts) == size[0] * size[1] and segmentation.get("size") == list(size))
    require(polygons or uncompressed, f"{where}: its segmentation is not {EXPECTED_SEGMENTATION} (at the image's "
                                      f"{size[0]} x {size[1]}).")
    encoded = coco_mask.frPyObjects(segmentation, *size)
    encoded = coco_mask.merge(encoded) if polygons else encoded
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}
