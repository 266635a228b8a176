"""Supervisely's served-model wire format: the settings a request carries, the prediction JSON, the error body."""

from __future__ import annotations

import base64
import io
import json
import zlib
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from kosmos_serve.engine import Request as EngineRequest
from kosmos_serve.engine import Result
from kosmos_serve.errors import InvalidRequestError, describe_validation_errors
from kosmos_serve.exports.masks import mask_pixels
from kosmos_serve.generation import GenerationParams, MaxNewTokens
from kosmos_serve.grounding import Mask
from kosmos_serve.server.common import MinScoreField
from kosmos_serve.server.errors import ErrorAnswer, ErrorFormat
from kosmos_serve.tasks import Task, TaskInput

PREFIX = "/supervisely"
TASK_TYPE = "prompt-based object detection"  # PromptBasedObjectDetection.get_info()["task type"]
DEFAULT_TEXT_PROMPT = "<grounding> An image of"  # serve-kosmos-2's src/inference_settings.yaml
SERVED = ("get_session_info", "get_custom_inference_settings", "get_output_classes_and_tags", "get_model_meta",
          "get_deploy_info", "is_deployed", "inference_image", "inference_batch", "inference_image_url")
# A box's score rides on its object as the SDK's detectors put it (ObjectDetection._create_label): a tag named
# "confidence" holding a number, declared in the model meta as Inference._get_confidence_tag_meta declares it.
CONFIDENCE_TAG = "confidence"
CONFIDENCE_TAG_META = {"name": CONFIDENCE_TAG, "value_type": "any_number", "color": "#0F8A4D", "hotkey": "",
                       "applicable_type": "all", "classes": [], "target_type": "all"}  # TagMeta.to_json's shape
# Inference.serve's routes that read Supervisely ids, which only the platform can turn into images.
NEEDS_PLATFORM = ("inference_image_id", "inference_image_id_async", "inference_batch_ids", "inference_batch_ids_async",
                  "inference_video_id", "inference_video_id_async", "inference_project_id_async", "run_speedtest",
                  "tracking_by_detection")


def is_supervisely_path(path: str) -> bool:
    """Whether `path` is one of this protocol's routes (its errors answer in Supervisely's shape)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def render_error(answer: ErrorAnswer, request: Request) -> JSONResponse:
    """An error as `Inference.serve`'s handler answers it, `{"detail", "success": false, "message"}`; bad input: 400."""
    message = answer.message
    if answer.problems is not None:  # list indices dropped: `files`, not `files.0`
        message = describe_validation_errors([{**problem, "loc": [p for p in problem["loc"] if not isinstance(p, int)]}
                                              for problem in answer.problems])
    status = 400 if answer.status == 422 else answer.status
    return JSONResponse({"detail": message, "success": False, "message": message}, status, headers=answer.headers)


# The engine's inputs by the inference settings that set them (`engine_request`)
SETTINGS_FIELDS = {"prompt": "settings.text_prompt", "max_new_tokens": "settings.max_new_tokens",
                   "min_score": "settings.min_score", "masks": "settings.masks"}
ERROR_FORMAT = ErrorFormat(owns=is_supervisely_path, render=render_error, names=SETTINGS_FIELDS)


class InferenceSettings(BaseModel):
    """`state.settings` of a request: serve-kosmos-2's keys, `min_score` and `masks`, plus SessionJSON's `classes`;
    other keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    text_prompt: str | None = None
    max_new_tokens: MaxNewTokens | None = None
    min_score: MinScoreField | None = None  # unset: the service's default (KOSMOS_MIN_SCORE)
    masks: bool = False  # each object a bitmap: its box's mask from the service's segmenter (serve --segmenter)
    classes: Any = None  # checked in inference_settings, with a message pydantic's union errors would not give


def read_state(text: str) -> dict:
    """The `state` a multipart form carries as JSON text (`{"settings": {...}}`), or a 400 naming the problem.

    >>> read_state('{"settings": {"max_new_tokens": 16}}')
    {'settings': {'max_new_tokens': 16}}
    """
    try:
        state = json.loads(text)
    except ValueError:
        raise InvalidRequestError('The settings field is not JSON; send {"settings": {"text_prompt": ...}}.') from None
    if not isinstance(state, dict):
        raise InvalidRequestError('The settings field must be a JSON object: {"settings": {"text_prompt": ...}}.')
    return state


def inference_settings(state: dict) -> InferenceSettings:
    """`state["settings"]` checked; keys serve-kosmos-2 reads but found outside `settings` are a 400, not ignored."""
    settings = state.get("settings")
    if settings is None:
        misplaced = sorted(set(state) & set(InferenceSettings.model_fields))
        if misplaced:
            raise InvalidRequestError(
                f"{', '.join(misplaced)} must sit inside settings: send {{\"settings\": {{\"{misplaced[0]}\": ...}}}}."
            )
        settings = {}
    if not isinstance(settings, dict):
        raise InvalidRequestError('settings must be a JSON object such as {"text_prompt": "<grounding> An image of"}.')
    try:
        checked = InferenceSettings.model_validate(settings)
    except ValidationError as error:
        raise InvalidRequestError(f"settings.{describe_validation_errors(error.errors())}.") from None
    classes = checked.classes
    if classes not in (None, "all") and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise InvalidRequestError('settings.classes must be a list of phrases to keep, or "all".')
    if checked.text_prompt is not None and not checked.text_prompt.strip():
        raise InvalidRequestError("settings.text_prompt is empty; give a Kosmos-2 prompt such as "
                                  "'<grounding> An image of'.")
    return checked


def engine_request(image: Image.Image, settings: InferenceSettings, default_min_score: float) -> EngineRequest:
    """The grounded generation serve-kosmos-2 runs for these settings (`<grounding>` added when missing); boxes
    scored under `settings.min_score` (unset: `default_min_score`) are dropped; with `settings.masks`, each box's
    mask is asked for."""
    task = TaskInput(Task.RAW, prompt=settings.text_prompt or DEFAULT_TEXT_PROMPT, grounding=True)
    threshold = settings.min_score if settings.min_score is not None else default_min_score
    return EngineRequest(image, task, GenerationParams(max_new_tokens=settings.max_new_tokens, min_score=threshold,
                                                       masks=settings.masks))


def rectangle_object(class_title: str, box: tuple[int, int, int, int], score: float | None = None) -> dict:
    """One box as a Supervisely rectangle label (`Label.to_json`); exterior is [[left, top], [right, bottom]].

    Its score, when given, is its "confidence" tag, as the SDK's detectors label a box.

    >>> rectangle_object("the blue circle", (132, 9, 225, 88), 0.75)["points"]
    {'exterior': [[132, 9], [225, 88]], 'interior': []}
    >>> rectangle_object("the blue circle", (132, 9, 225, 88), 0.75)["tags"]
    [{'name': 'confidence', 'value': 0.75}]
    """
    x1, y1, x2, y2 = box
    return {
        "classTitle": class_title,
        "description": "",
        "tags": [] if score is None else [{"name": CONFIDENCE_TAG, "value": score}],
        "points": {"exterior": [[min(x1, x2), min(y1, y2)], [max(x1, x2), max(y1, y2)]], "interior": []},
        "geometryType": "rectangle",
        "shape": "rectangle",
        "nnCreated": True,
        "nnUpdated": True,
    }


def bitmap_object(class_title: str, mask: Mask, score: float) -> dict | None:
    """One mask as a Supervisely bitmap label (`Label.to_json` of an `sly.Bitmap`), or None when it is empty.

    The bitmap is the mask cropped to its pixels, `origin` its [left, top]; `data` is a 1-bit palette PNG (index 1
    opaque white, index 0 transparent) compressed with zlib, in base64, as `Bitmap.data_2_base64` writes it.

    >>> bitmap_object("a dot", Mask((3, 4), "722O"), 0.5)["bitmap"]["origin"]
    [2, 1]
    """
    pixels = mask_pixels(mask)
    if not pixels.any():
        return None
    rows, columns = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    cropped = pixels[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    image = Image.fromarray(cropped.astype(np.uint8))
    image.putpalette([0, 0, 0, 255, 255, 255])
    png = io.BytesIO()
    image.save(png, format="PNG", transparency=0)
    return {
        "classTitle": class_title,
        "description": "",
        "tags": [{"name": CONFIDENCE_TAG, "value": score}],
        "bitmap": {"origin": [int(columns[0]), int(rows[0])],
                   "data": base64.b64encode(zlib.compress(png.getvalue())).decode("ascii")},
        "geometryType": "bitmap",
        "shape": "bitmap",
        "nnCreated": True,
        "nnUpdated": True,
    }


def prediction(result: Result, classes: list[str] | str | None = None, name: str | None = None,
               masks: bool = False) -> dict:
    """A result as the SDK's prediction JSON: the annotation (caption as its description) and `data`, the /v1 answer.

    Each box of each grounded phrase is one object, its score its "confidence" tag: a rectangle, or with `masks`
    its mask as a bitmap (a box whose mask is empty is left out); `classes` (a list) keeps only those phrases.
    """
    width, height = result.image_size
    kept = [entity for entity in result.entities
            if entity.phrase.strip() and (not isinstance(classes, list) or entity.phrase in classes)]
    if masks:
        objects = [found for entity in kept for mask, score in zip(entity.masks, entity.scores, strict=True)
                   if (found := bitmap_object(entity.phrase, mask, score)) is not None]
    else:
        objects = [rectangle_object(entity.phrase, box, score)
                   for entity in kept for box, score in zip(entity.pixel_boxes, entity.scores, strict=True)]
    annotation = {"description": result.text, "size": {"height": height, "width": width}, "tags": [],
                  "objects": objects, "customBigData": {}}
    return {
        "source": None, "annotation": annotation, "name": name, "path": None, "url": None, "project_id": None,
        "dataset_id": None, "image_id": None, "video_id": None, "frame_index": None, "slides_data": {},
        "data": result.to_dict(),
    }

