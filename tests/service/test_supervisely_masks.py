"""Supervisely's protocol with `settings.masks`: each object a bitmap, read back by the `supervisely` SDK itself
(`sly.Annotation.from_json` with the meta `Session` builds, `sly.Bitmap`), in its own environment
(tests/tool_environments.py).

The protocol-level tests build results by hand from real masks (pycocotools' encoding, as the engine's); the
service tests run with a segmenter (`EngineSettings(segmenter=...)`) or without one.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from local_server import serve_in_thread
from pycocotools import mask as coco_mask

from kosmos_serve.asgi import create_app
from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.engine import Engine, Result, Timings
from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.exports.masks import mask_pixels
from kosmos_serve.grounding import Entity, Mask
from kosmos_serve.server.supervisely.protocol import CONFIDENCE_TAG_META, inference_settings, prediction
from kosmos_serve.tasks import Task

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools'

REPO = Path(__file__).resolve().parents[2]
SCENE = REPO / "examples" / "scene-four-shapes.png"  # 229 x 195
WIDTH, HEIGHT = 229, 195
MODEL_META = {"classes": [], "tags": [CONFIDENCE_TAG_META]}  # what /get_model_meta answers

# Runs in the SDK's environment: stdin holds [annotation JSON, model meta JSON, full masks]. Prints, for each label,
# what the SDK read (class, geometry, origin, confidence, the bitmap drawn back on the image) and what sly.Bitmap
# writes for the same mask.
SDK_READS = r"""
import json, sys
import numpy as np
import supervisely as sly
from supervisely.convert.image.sly.sly_image_helper import get_meta_from_annotation

annotation, model_meta, masks = json.load(sys.stdin)
meta = get_meta_from_annotation(annotation, sly.ProjectMeta.from_json(model_meta))  # as sly.nn.inference.Session does
read = sly.Annotation.from_json(annotation, meta)
labels = []
for label, mask in zip(read.labels, masks):
    geometry = label.geometry
    drawn = np.zeros((read.img_size[0], read.img_size[1]), bool)
    drawn[geometry.origin.row:geometry.origin.row + geometry.data.shape[0],
          geometry.origin.col:geometry.origin.col + geometry.data.shape[1]] = geometry.data
    own = sly.Bitmap(np.array(mask, dtype=bool)).to_json()
    labels.append({"class": label.obj_class.name, "shape": label.obj_class.geometry_type.geometry_name(),
                   "geometry": geometry.geometry_name(), "origin": [geometry.origin.col, geometry.origin.row],
                   "confidence": label.tags.get("confidence").value, "drawn": drawn.tolist(),
                   "sdk_origin": own["bitmap"]["origin"]})
print("RESULT " + json.dumps(labels))
"""


def sdk_reads(python: str, annotation: dict, masks: list[np.ndarray]) -> list[dict]:
    done = subprocess.run([python, "-c", SDK_READS], input=json.dumps([annotation, MODEL_META,
                                                                       [m.tolist() for m in masks]]),
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def blob(x1, y1, x2, y2) -> np.ndarray:
    """An ellipse in a pixel box with a notch cut out of it, as an H x W boolean mask of the scene."""
    rows, columns = np.mgrid[:HEIGHT, :WIDTH] + 0.5
    pixels = ((columns - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2 + ((rows - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2 <= 1
    pixels[(y1 + y2) // 2:, (x1 + x2) // 2:(x1 + x2) // 2 + 3] = False
    return pixels


def encode(pixels: np.ndarray) -> Mask:
    return Mask((HEIGHT, WIDTH), coco_mask.encode(np.asfortranarray(pixels.astype(np.uint8)))["counts"].decode())


def result_with_masks(objects: list[tuple[str, tuple[int, int, int, int], np.ndarray, float]]) -> Result:
    entities = tuple(Entity(phrase, (0, len(phrase)), ((x1 / WIDTH, y1 / HEIGHT, x2 / WIDTH, y2 / HEIGHT),),
                            ((x1, y1, x2, y2),), (score,), (encode(pixels),), (0.9,))
                     for phrase, (x1, y1, x2, y2), pixels, score in objects)
    return Result(Task.RAW, "<grounding> An image of", "An image of a blue circle and a cross", "", "", entities, "",
                  (WIDTH, HEIGHT), 20, False, Timings())


# ------------------------------------------------------------------------------------------------ the protocol


def test_masks_become_bitmaps_the_sdk_reads_back(supervisely_python):
    circle, cross = blob(134, 0, 221, 87), blob(133, 98, 183, 148)
    result = result_with_masks([("a blue circle", (134, 0, 221, 87), circle, 0.8),
                                ("a cross", (133, 98, 183, 148), cross, 0.6)])
    answer = prediction(result, masks=True)
    objects = answer["annotation"]["objects"]
    assert [(o["classTitle"], o["geometryType"], o["tags"]) for o in objects] == [
        ("a blue circle", "bitmap", [{"name": "confidence", "value": 0.8}]),
        ("a cross", "bitmap", [{"name": "confidence", "value": 0.6}])]
    assert answer["data"]["entities"][0]["masks"][0] == result.entities[0].masks[0].to_dict()  # the /v1 answer

    read = sdk_reads(supervisely_python, answer["annotation"], [circle, cross])
    for label, pixels, phrase, confidence in zip(read, (circle, cross), ("a blue circle", "a cross"), (0.8, 0.6)):
        assert (label["class"], label["shape"], label["geometry"]) == (phrase, "bitmap", "bitmap")
        assert label["confidence"] == confidence
        assert (np.array(label["drawn"]) == pixels).all()  # the SDK's bitmap, back on the image, is the mask
        assert label["origin"] == label["sdk_origin"]  # where sly.Bitmap puts it: its tight crop's corner

    boxes = prediction(result)["annotation"]["objects"]  # without masks: rectangles, as before
    assert [o["geometryType"] for o in boxes] == ["rectangle", "rectangle"]


def test_an_empty_mask_leaves_its_object_out_and_classes_still_filter():
    empty = np.zeros((HEIGHT, WIDTH), bool)
    result = result_with_masks([("a blue circle", (134, 0, 221, 87), empty, 0.8),
                                ("a cross", (133, 98, 183, 148), blob(133, 98, 183, 148), 0.6)])
    assert [o["classTitle"] for o in prediction(result, masks=True)["annotation"]["objects"]] == ["a cross"]
    assert prediction(result, ["a blue circle"], masks=True)["annotation"]["objects"] == []  # sly.Bitmap refuses empty


def test_masks_is_a_yes_or_no_setting():
    assert inference_settings({"settings": {"masks": True}}).masks is True
    assert inference_settings({"settings": {}}).masks is False
    with pytest.raises(InvalidRequestError, match="settings.masks"):
        inference_settings({"settings": {"masks": "sometimes"}})


# ------------------------------------------------------------------------------------------------ the service

NEEDS_SEGMENTER_SETTING = pytest.mark.skipif(
    "segmenter" not in EngineSettings.model_fields,
    reason="the engine's --segmenter (EngineSettings.segmenter) comes with the masks branch")


def upload(settings: dict) -> dict:
    return {"files": [("files", ("scene.png", SCENE.read_bytes())),
                      ("settings", (None, json.dumps({"settings": settings}), "text/plain"))]}


@NEEDS_SEGMENTER_SETTING
def test_without_a_segmenter_masks_are_refused_saying_how_to_load_one():
    engine = Engine(EngineSettings(model="demo", device="cpu"))
    with serve_in_thread(create_app(ServerSettings(demo=False), engine.settings, engine=engine)) as base_url:
        response = httpx.post(f"{base_url}/supervisely/inference_image", timeout=120,
                              **upload({"max_new_tokens": 32, "masks": True}))
    assert response.status_code == 400, response.text  # Supervisely's servers answer bad input 400
    body = response.json()
    assert set(body) == {"detail", "success", "message"} and body["success"] is False
    assert "segmenter" in body["message"], body["message"]


@NEEDS_SEGMENTER_SETTING
def test_with_a_segmenter_the_bitmaps_are_the_masks_v1_generate_gives(supervisely_python):
    engine = Engine(EngineSettings(model="demo", device="cpu", segmenter="demo"))
    with serve_in_thread(create_app(ServerSettings(demo=False), engine.settings, engine=engine)) as base_url:
        response = httpx.post(f"{base_url}/supervisely/inference_image", timeout=120,
                              **upload({"max_new_tokens": 32, "masks": True, "min_score": 0}))
    assert response.status_code == 200, response.text
    answer = response.json()
    masks = [mask_pixels(mask) for entity in answer["data"]["entities"] for mask in entity["masks"]]
    kept = [pixels for pixels in masks if pixels.any()]
    assert kept, "the demo segmenter drew no mask on the scene"
    read = sdk_reads(supervisely_python, answer["annotation"], kept)
    assert len(read) == len(kept) and all(label["geometry"] == "bitmap" for label in read)
    assert all((np.array(label["drawn"]) == pixels).all() for label, pixels in zip(read, kept))
