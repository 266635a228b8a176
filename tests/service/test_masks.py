"""Masks over HTTP: `masks: true` on /v1/generate (JSON and upload), the 422 without a segmenter, /info."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from local_server import serve_in_thread
from PIL import Image

from kosmos_serve.asgi import create_app
from kosmos_serve.config import ServerSettings
from kosmos_serve.engine import GenerationParams
from kosmos_serve.grounding import Mask
from kosmos_serve.tasks import Task, TaskInput

BOXES = [[10, 20, 150, 160], [0, 0, 90, 60]]
BOX_TUPLES = tuple(tuple(box) for box in BOXES)


@pytest.fixture(scope="module")
def masked(segmenting_engine):
    """The service on the tiny Kosmos-2 with the tiny SAM as its segmenter; yields its base URL."""
    app = create_app(ServerSettings(demo=False), segmenting_engine.settings, engine=segmenting_engine)
    with serve_in_thread(app) as url:
        yield url


def body(png: bytes, **fields) -> dict:
    return {"image": base64.b64encode(png).decode(), "task": "referring_generation", "boxes": BOXES,
            "max_new_tokens": 8, **fields}


def test_masks_true_gives_each_box_a_mask_in_the_images_pixels(masked, png_bytes, segmenting_engine, sample_images):
    answer = httpx.post(f"{masked}/v1/generate", json=body(png_bytes[0], masks=True), timeout=60)
    assert answer.status_code == 200, answer.text
    entity = answer.json()["entities"][0]
    width, height = sample_images[0].size
    assert [mask["size"] for mask in entity["masks"]] == [[height, width]] * len(BOXES)
    assert len(entity["mask_scores"]) == len(BOXES) and "segmentation_seconds" in answer.json()["timings"]
    engine_side = segmenting_engine.predict(sample_images[0], TaskInput(Task.REFERRING_GENERATION, boxes=BOX_TUPLES),
                                            GenerationParams(max_new_tokens=8, masks=True)).entities[0]
    assert [Mask(tuple(m["size"]), m["counts"]) for m in entity["masks"]] == list(engine_side.masks)
    assert np.asarray(Mask(tuple(entity["masks"][0]["size"]), entity["masks"][0]["counts"]).to_array()).any()


def test_without_masks_the_answer_has_none(masked, png_bytes):
    entity = httpx.post(f"{masked}/v1/generate", json=body(png_bytes[0]), timeout=60).json()["entities"][0]
    assert "masks" not in entity and "mask_scores" not in entity


def test_the_upload_form_takes_masks_and_the_drawn_image_shows_them(masked, png_bytes):
    answer = httpx.post(f"{masked}/v1/generate/upload", files={"image": ("a.png", png_bytes[1], "image/png")},
                        data={"task": "referring_generation", "boxes": "[[10, 20, 150, 160]]", "masks": "true",
                              "max_new_tokens": "8", "return_image": "true"}, timeout=60)
    assert answer.status_code == 200, answer.text
    drawn = Image.open(io.BytesIO(base64.b64decode(answer.json()["annotated_image"]))).convert("RGB")
    plain = httpx.post(f"{masked}/v1/generate/upload", files={"image": ("a.png", png_bytes[1], "image/png")},
                       data={"task": "referring_generation", "boxes": "[[10, 20, 150, 160]]", "max_new_tokens": "8",
                             "return_image": "true"}, timeout=60).json()["annotated_image"]
    unmasked = Image.open(io.BytesIO(base64.b64decode(plain))).convert("RGB")
    assert len(answer.json()["entities"][0]["masks"]) == 1
    assert np.asarray(drawn).tobytes() != np.asarray(unmasked).tobytes()


def test_info_names_the_segmenter(masked, tiny_segmenter_dir):
    info = httpx.get(f"{masked}/info").json()
    assert info["segmenter"] == {"model": str(tiny_segmenter_dir), "model_type": "sam"}


def test_masks_without_a_segmenter_is_a_422_saying_how_to_load_one(serve, png_bytes):
    with serve() as url:
        answer = httpx.post(f"{url}/v1/generate", json=body(png_bytes[0], masks=True), timeout=60)
        assert httpx.get(f"{url}/info").json()["segmenter"] is None
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "invalid_request" and error["message"].startswith("masks: ")
    assert "--segmenter" in error["message"] and "KOSMOS_SEGMENTER" in error["message"]


def test_masks_must_be_a_boolean(masked, png_bytes):
    answer = httpx.post(f"{masked}/v1/generate", json=body(png_bytes[0], masks="several"), timeout=60)
    assert answer.status_code == 422 and answer.json()["error"]["message"].startswith("masks: ")

