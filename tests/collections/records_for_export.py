"""What the export tests share: records written by hand (so these tests do not depend on `kosmos-serve
annotate`), and `kosmos-serve export` run on them.

Two images in two folders and one that failed; a phrase with two boxes, each its own score; two
phrases of one ontology class; a box with reversed corners and one of zero width. `add_masks` gives every
box a real mask (an ellipse in its box, encoded by pycocotools), as `annotate --masks` writes them.
"""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from kosmos_serve.cli import main

# boxes in pixels of each image
STREET = ("photos/a/street.png", 200, 100)
PARK = ("photos/b/park.png", 300, 150)
BROKEN = "photos/broken.png"
STREET_CARS = [[10, 20, 60, 80], [100, 10, 150, 50]]  # one entity, two boxes, each its own score, an ontology class
STREET_CAR_SCORES = [0.9, 0.45]
STREET_DOG_REVERSED = [190, 90, 120, 40]  # the lower-right corner came first
STREET_DOG = (120, 40, 190, 90)
STREET_DOG_SCORE = 0.6
PARK_TRUCK = [200, 50, 280, 120]  # another phrase of the class car
PARK_TRUCK_SCORE = 0.75
PARK_TREE = [30, 15, 90, 135]
PARK_TREE_SCORE = 0.8
PARK_BENCH_FLAT = [50, 60, 50, 90]  # zero width: left out


def entity(phrase, pixel_boxes, width, height, scores, class_name=None):
    """An entity as annotate writes it: normalised boxes beside the pixel ones, a score per box."""
    boxes = [[x1 / width, y1 / height, x2 / width, y2 / height] for x1, y1, x2, y2 in pixel_boxes]
    return {"phrase": phrase, "class": class_name, "span": [0, len(phrase)], "boxes": boxes,
            "pixel_boxes": pixel_boxes, "scores": scores}


def annotated(root, path, width, height, entities):
    return {"path": path, "resolved": str(root / path), "sha256": "ab" * 32, "width": width, "height": height,
            "task": "detection", "prompt": "<grounding><phrase> a red car</phrase>", "text": "", "answer": "",
            "raw_text": "", "entities": entities, "markdown": "", "generated_tokens": 9, "model": "demo",
            "quantize": "none", "min_score": 0.3, "kosmos_serve_version": "0.1.0"}


def make_records(root):
    """The records (annotated, failed, annotated), their real image files written under root/photos."""
    street = annotated(root, *STREET, [
        entity("a red car", STREET_CARS, 200, 100, STREET_CAR_SCORES, class_name="car"),
        entity("a dog", [STREET_DOG_REVERSED], 200, 100, [STREET_DOG_SCORE]),
    ])
    failed = {"path": BROKEN, "resolved": str(root / BROKEN), "sha256": None, "width": None, "height": None,
              "task": "detection", "error": {"code": "invalid_image", "message": "not an image"}, "model": "demo",
              "kosmos_serve_version": "0.1.0"}
    park = annotated(root, *PARK, [
        entity("a tree", [PARK_TREE], 300, 150, [PARK_TREE_SCORE]),
        entity("a truck", [PARK_TRUCK], 300, 150, [PARK_TRUCK_SCORE], class_name="car"),
        entity("a bench", [PARK_BENCH_FLAT], 300, 150, [0.5]),
    ])
    for path, width, height in (STREET, PARK):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), "white").save(root / path)
    return [street, failed, park]


def write_records(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def invoke(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)], catch_exceptions=False)


def export(records_file, format_name, *options):
    out = records_file.parent / f"{format_name}.json"
    result = invoke(records_file, "--format", format_name, "--out", out, *options)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output.strip()


def ellipse(box, width, height):
    """The H x W boolean mask of the ellipse inscribed in a pixel box (corners in either order)."""
    x1, x2 = sorted(box[0::2])
    y1, y2 = sorted(box[1::2])
    rows, columns = np.mgrid[:height, :width] + 0.5
    radius_x, radius_y = max(x2 - x1, 1) / 2, max(y2 - y1, 1) / 2
    return ((columns - (x1 + x2) / 2) / radius_x) ** 2 + ((rows - (y1 + y2) / 2) / radius_y) ** 2 <= 1


def encode(pixels):
    """A boolean mask as the record's JSON: pycocotools' compressed RLE, counts as text."""
    from pycocotools import mask as coco_mask

    encoded = coco_mask.encode(np.asfortranarray(pixels.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def add_masks(records):
    """Each box of each annotated record gets the ellipse in its box as its mask, and a mask score; returns the
    masks' pixels by (record index, entity index, box index)."""
    pixels = {}
    for record_number, record in enumerate(records):
        if record.get("error"):
            continue
        width, height = record["width"], record["height"]
        for entity_number, item in enumerate(record["entities"]):
            item["masks"], item["mask_scores"] = [], []
            for box_number, box in enumerate(item["pixel_boxes"]):
                pixels[record_number, entity_number, box_number] = ellipse(box, width, height)
                item["masks"].append(encode(pixels[record_number, entity_number, box_number]))
                item["mask_scores"].append(round(0.8 + 0.05 * box_number, 2))
    return pixels
