"""Labelled images -> a COCO detection (and, with masks, instance segmentation) dataset, what pycocotools'
`COCO(file)` and `loadRes` read."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from kosmos_serve.exports.masks import mask_area
from kosmos_serve.exports.records import LINE_LABEL, AnnotatedImage


def to_coco(images: Sequence[AnnotatedImage]) -> dict:
    """A COCO dataset: images (ids from 1, by name), annotations with [x, y, w, h], area and score, categories.

    Category ids count from 1 over the labels in alphabetical order. An annotation's `segmentation` is its
    box's mask as COCO run-length encoding and its `area` the mask's pixel count when the records have masks
    (`annotate --masks`); otherwise `segmentation` is empty and `area` the box's. Each keeps its box's `score`,
    so the same annotations serve as detection or segmentation results (`COCO.loadRes` on a ground truth of
    these images and categories, then `COCOeval` with iouType "bbox" or "segm").

    Each line read (records of task ocr) is an annotation of the category LINE_LABEL whose `segmentation` is its
    four corners as one polygon and whose `attributes` hold its `text`: where CVAT's COCO files keep an object's
    attributes, and what COCO-Text's `utf8_string` is, in a key that pycocotools and supervision read past.
    """
    names = sorted({box.label for image in images for box in image.boxes}
                   | ({LINE_LABEL} if any(image.lines for image in images) else set()))
    category_ids = {name: number for number, name in enumerate(names, start=1)}
    models = sorted({image.model for image in images if image.model})
    annotations = []
    for image_id, image in enumerate(images, start=1):
        for box in image.boxes:
            x1, y1, x2, y2 = box.xyxy
            if box.mask is None:
                segmentation, area = [], (x2 - x1) * (y2 - y1)
            else:
                segmentation, area = box.mask.to_dict(), mask_area(box.mask)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_ids[box.label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": area, "iscrowd": 0, "segmentation": segmentation, "score": box.score})
        for line in image.lines:
            x1, y1, x2, y2 = line.xyxy
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_ids[LINE_LABEL], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                                "segmentation": [[value for corner in line.corners for value in corner]],
                                "score": line.score, "attributes": {"text": line.text}})
    return {
        "info": {"description": f"{contents(images)} ({', '.join(models) or 'no model'}) exported by kosmos-serve",
                 "version": package_version(), "contributor": "kosmos-serve"},
        "licenses": [],
        "images": [{"id": number, "file_name": image.name, "width": image.width, "height": image.height}
                   for number, image in enumerate(images, start=1)],
        "annotations": annotations,
        "categories": [{"id": number, "name": name, "supercategory": "object"}
                       for name, number in category_ids.items()],
    }


def contents(images: Sequence[AnnotatedImage]) -> str:
    """What the images hold: "Kosmos-2 boxes", "Kosmos-2.5 text lines", or both."""
    has_lines = any(image.lines for image in images)
    has_boxes = any(image.boxes for image in images) or not has_lines
    return " and ".join(part for part, held in (("Kosmos-2 boxes", has_boxes), ("Kosmos-2.5 text lines", has_lines))
                        if held)


def package_version() -> str:
    """kosmos-serve's installed version ("unknown" when run from a bare source tree)."""
    try:
        return version("kosmos-serve")
    except PackageNotFoundError:
        return "unknown"
