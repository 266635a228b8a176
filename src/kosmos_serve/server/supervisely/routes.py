"""Supervisely's served-model routes under `/supervisely`, as `Inference.serve` answers them for `SessionJSON`."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from PIL import Image

from kosmos_serve.engine import Result
from kosmos_serve.errors import InvalidRequestError, KosmosServeError
from kosmos_serve.generation import BUILT_IN_DEFAULTS
from kosmos_serve.server.common import DisconnectWatch, client_gone, decode_image, service_state
from kosmos_serve.server.errors import AnsweringRoute
from kosmos_serve.server.state import ServiceState
from kosmos_serve.server.supervisely.protocol import (
    CONFIDENCE_TAG_META,
    DEFAULT_TEXT_PROMPT,
    NEEDS_PLATFORM,
    PREFIX,
    SERVED,
    TASK_TYPE,
    engine_request,
    inference_settings,
    prediction,
    read_state,
)

router = APIRouter(prefix=PREFIX, route_class=AnsweringRoute, include_in_schema=False)


def _default_max_new_tokens(state: ServiceState) -> int:
    if state.engine is not None:
        return state.engine.defaults.max_new_tokens
    return state.engine_settings.max_new_tokens or BUILT_IN_DEFAULTS.max_new_tokens


async def _decode(state: ServiceState, upload: UploadFile, index: int, count: int) -> Image.Image:
    """The upload as an RGB image (pixel cap checked before decoding); errors name the file when there are several."""
    data = await upload.read()
    try:
        return await decode_image(state, data)
    except KosmosServeError as error:
        if count == 1:
            raise
        raise type(error)(f"files[{index}] ({upload.filename or 'no name'}): {error.message}") from None


def _one_state(settings: str, state: str) -> dict:
    """Inference.serve's rule: the `state` field when given, else the `settings` field (both hold a state)."""
    return read_state(settings if state in ("", "{}") else state)


@router.post("/get_session_info")
async def get_session_info(request: Request):
    state = service_state(request)
    state.ready_batcher()  # like Inference's _check_serve_before_call: the model must be served
    return {
        "app_name": "kosmos-serve",
        "session_id": None,
        "number_of_classes": 0,  # serve-kosmos-2's: classes come from the prompt's phrases
        "sliding_window_support": "none",
        "videos_support": False,
        "async_video_inference_support": False,
        "tracking_on_videos_support": False,
        "async_image_inference_support": False,
        "tracking_algorithms": [],
        "batch_inference_support": True,
        "max_batch_size": None,
        "task type": TASK_TYPE,
        "model": state.engine_settings.model,
        "version": request.app.version,
    }


@router.post("/get_custom_inference_settings")
async def get_custom_inference_settings(request: Request):
    """The defaults as YAML text, as serve-kosmos-2 sends its inference_settings.yaml (SessionJSON parses it)."""
    state = service_state(request)
    yaml = (
        "# text_prompt: a Kosmos-2 prompt; <grounding> is put in front when missing.\n"
        f"text_prompt: {json.dumps(DEFAULT_TEXT_PROMPT)}\n"
        f"max_new_tokens: {_default_max_new_tokens(state)}\n"
        "# min_score: boxes scored under this (0..1) are left out; each object's score is its confidence tag.\n"
        f"min_score: {state.default_min_score}\n"
        "# masks: true makes each object a bitmap, its box's mask (the service needs a segmenter: serve --segmenter).\n"
        "masks: false\n"
    )
    return {"settings": yaml}


@router.post("/get_output_classes_and_tags")
@router.post("/get_model_meta")
async def get_output_classes_and_tags():
    """No fixed classes: each answer's phrases are its classes (the SDK's Session adds them from the annotation); the
    one tag is "confidence", each object's score."""
    multi_view = {"enabled": False, "tagName": None, "tagId": None, "isSynced": False}
    return {"classes": [], "tags": [CONFIDENCE_TAG_META], "projectSettings": {"multiView": multi_view}}


@router.post("/is_deployed")
async def is_deployed(request: Request):
    # the key's colon is the SDK's own (Inference.serve's /is_deployed)
    deployed = service_state(request).batcher is not None
    return {"deployed": deployed, "description:": "Model is ready to receive requests"}


@router.post("/get_deploy_info")
async def get_deploy_info(request: Request):
    """The fields of the SDK's `DeployInfo` (supervisely/nn/utils.py)."""
    state = service_state(request)
    state.ready_batcher()
    engine, model = state.engine, state.engine_settings.model
    dtype = str(engine.dtype).removeprefix("torch.")
    quantized = [bits for bits in ("INT4", "INT8") if any(part.startswith(bits.lower())
                                                          for part in engine.weight_formats.values())]
    precision = quantized[0] if quantized else {"float16": "FP16", "bfloat16": "BF16"}.get(dtype, "FP32")
    return {
        "checkpoint_name": model.rstrip("/").rsplit("/", 1)[-1], "model_name": model, "architecture": "Kosmos-2",
        "checkpoint_url": None, "custom_checkpoint_path": None, "model_source": "kosmos-serve", "task_type": TASK_TYPE,
        "device": str(engine.device), "runtime": "PyTorch", "model_precision": precision,
        "hardware": str(engine.device), "deploy_params": {"model": model, "quantize": engine.settings.quantize},
    }


@router.post("/inference_image")
async def inference_image(
    request: Request,
    files: Annotated[list[UploadFile] | None, File(description="The image, one file part named `files`.")] = None,
    settings: Annotated[str, Form()] = "{}",
    state: Annotated[str, Form()] = "{}",
):
    service = service_state(request)
    checked = inference_settings(_one_state(settings, state))
    if not files:
        raise InvalidRequestError("No image: send it as a multipart file part named `files` "
                                  "(curl -F files=@image.png).")
    if len(files) != 1:
        raise InvalidRequestError(
            f"Only one file expected but got {len(files)}; send several to {PREFIX}/inference_batch."
        )
    image = await _decode(service, files[0], 0, 1)
    request_for = engine_request(image, checked, service.default_min_score)
    result = await service.generate(request_for, functools.partial(client_gone, request))
    return prediction(result, checked.classes, files[0].filename, checked.masks)


@router.post("/inference_batch")
async def inference_batch(
    request: Request,
    files: Annotated[list[UploadFile] | None, File(description="The images, each a file part named `files`.")] = None,
    settings: Annotated[str, Form()] = "{}",
    state: Annotated[str, Form()] = "{}",
):
    """One prediction per file, in order; they reach the batcher a batch at a time."""
    service = service_state(request)
    checked = inference_settings(_one_state(settings, state))
    if not files:
        raise InvalidRequestError("No images: send each as a multipart file part named `files` (curl -F files=@a.png).")
    images = [await _decode(service, upload, index, len(files)) for index, upload in enumerate(files)]
    gone = DisconnectWatch(request)  # one listener for the whole batch
    results: list[Result] = []
    try:
        step = service.settings.max_batch_requests
        for start in range(0, len(images), step):
            chunk = [engine_request(image, checked, service.default_min_score) for image in images[start:start + step]]
            results += await asyncio.gather(*(service.generate(r, gone) for r in chunk))
    finally:
        gone.close()
    return [prediction(result, checked.classes, upload.filename, checked.masks) for result, upload in zip(results, files)]


@router.post("/inference_image_url")
async def inference_image_url(request: Request):
    """`state.image_url`: fetched only from the hosts the service allows (KOSMOS_ALLOWED_IMAGE_HOSTS)."""
    service = service_state(request)
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise InvalidRequestError('The body is not JSON; send {"state": {"image_url": "https://..."}}.') from None
    state = body.get("state") if isinstance(body, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("image_url"), str) or not state["image_url"]:
        raise InvalidRequestError('state.image_url is missing; send {"state": {"image_url": "https://..."}}.')
    checked = inference_settings(state)
    image = await decode_image(service, await service.image_bytes(state["image_url"]))
    request_for = engine_request(image, checked, service.default_min_score)
    result = await service.generate(request_for, functools.partial(client_gone, request))
    return prediction(result, checked.classes, masks=checked.masks)


@router.api_route("/{endpoint:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def not_served(endpoint: str, request: Request):
    """Platform routes: a 400 that says why; another served route's method: 405; anything else: 404."""
    if endpoint in NEEDS_PLATFORM:
        raise InvalidRequestError(
            f"{PREFIX}/{endpoint} takes Supervisely ids, which only a Supervisely platform can turn into images; "
            f"kosmos-serve runs without one: send the image itself to {PREFIX}/inference_image "
            "(SessionJSON.inference_image_path) or its URL to inference_image_url."
        )
    if endpoint in SERVED:
        raise HTTPException(405, f"{PREFIX}/{endpoint} takes POST, as the Supervisely SDK sends it.")
    served = ", ".join(SERVED)
    raise HTTPException(404, f"{PREFIX}/{endpoint} is not served here; kosmos-serve serves {served}.")
