"""Supervisely's served-model protocol under `/supervisely`, for the `supervisely` SDK's `SessionJSON`.

    session = sly.nn.inference.SessionJSON(sly.Api("http://localhost", "unused"),
                                           session_url="http://127.0.0.1:8000/supervisely")
    session.inference_image_path("scene.png")  # -> {"annotation": {...}, "data": {...}, ...}

The model serves as a *prompt-based object detector*, as supervisely-ecosystem/serve-kosmos-2 does:
`text_prompt` is a Kosmos-2 prompt (`<grounding>` is put in front when missing, as serve-kosmos-2
does, since without it Kosmos-2 draws no boxes), and every box of every grounded phrase of the
answer becomes one `rectangle` object whose class is the phrase. `classes` in the settings (the one
key SessionJSON allows besides the defaults) keeps only the objects whose phrase it lists, as the
SDK's `Inference._predictions_to_annotation` does with it; `"all"` or none keeps every object.

Wire shapes follow the SDK (supervisely/supervisely, release 6.74.51): the routes and their
payloads of `Inference.serve` and its error handler (`supervisely/nn/inference/inference.py`),
what the client sends (`supervisely/nn/inference/session.py`), a prediction
(`supervisely/nn/model/prediction.py`, `Prediction.to_json`, plus the `data` that
`Inference._format_output` adds) and a rectangle label (`supervisely/annotation/label.py`,
`Label.to_json`). The settings and their defaults are serve-kosmos-2's `src/inference_settings.yaml`.

Every request goes through the service's batcher, limits, image decoding, API key and metrics, like
the other routes. Errors answer as Supervisely's servers do, `{"detail", "success": false,
"message"}`; routes that take Supervisely ids (images, videos, projects) need the platform and
answer 400 saying so.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kosmos_serve.engine import Request as EngineRequest
from kosmos_serve.engine import Result
from kosmos_serve.errors import InvalidRequestError, KosmosServeError, ServiceBusyError, describe_validation_errors
from kosmos_serve.generation import BUILT_IN_DEFAULTS, GenerationParams, MaxNewTokens
from kosmos_serve.images import load_image
from kosmos_serve.server.routes import client_gone
from kosmos_serve.server.state import ServiceState
from kosmos_serve.tasks import Task, TaskInput

PREFIX = "/supervisely"
TASK_TYPE = "prompt-based object detection"  # PromptBasedObjectDetection.get_info()["task type"]
DEFAULT_TEXT_PROMPT = "<grounding> An image of"  # serve-kosmos-2's src/inference_settings.yaml
SERVED = ("get_session_info", "get_custom_inference_settings", "get_output_classes_and_tags", "get_model_meta",
          "get_deploy_info", "is_deployed", "inference_image", "inference_batch", "inference_image_url")
# Inference.serve's routes that read Supervisely ids, which only the platform can turn into images.
NEEDS_PLATFORM = ("inference_image_id", "inference_image_id_async", "inference_batch_ids", "inference_batch_ids_async",
                  "inference_video_id", "inference_video_id_async", "inference_project_id_async", "run_speedtest",
                  "tracking_by_detection")


def is_supervisely_path(path: str) -> bool:
    """Whether `path` is one of this protocol's routes (its errors answer in Supervisely's shape)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error as `Inference.serve`'s handler answers it: `{"detail", "success": false, "message"}`."""
    return JSONResponse({"detail": message, "success": False, "message": message}, status, headers=headers)


class SuperviselyRoute(APIRoute):
    """A route whose every error answers in Supervisely's shape; bad input is a 400, as Supervisely's own."""

    def get_route_handler(self):
        handle = super().get_route_handler()

        async def handle_in_supervisely_shape(request: Request):
            try:
                return await handle(request)
            except KosmosServeError as error:
                headers = {"Retry-After": str(error.retry_after)} if isinstance(error, ServiceBusyError) else None
                return error_response(400 if error.status == 422 else error.status, error.message, headers)
            except RequestValidationError as error:  # list indices dropped: `files`, not `files.0`
                problems = [{**problem, "loc": [p for p in problem["loc"] if not isinstance(p, int)]}
                            for problem in error.errors()]
                return error_response(400, describe_validation_errors(problems))
            except StarletteHTTPException as error:  # a multipart body that cannot be parsed
                return error_response(error.status_code, str(error.detail))

        return handle_in_supervisely_shape


router = APIRouter(prefix=PREFIX, route_class=SuperviselyRoute, include_in_schema=False)


class InferenceSettings(BaseModel):
    """`state.settings` of a request: serve-kosmos-2's keys, plus SessionJSON's `classes`; other keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    text_prompt: str | None = None
    max_new_tokens: MaxNewTokens | None = None
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
        raise InvalidRequestError("settings.text_prompt is empty; give a Kosmos-2 prompt such as '<grounding> An image of'.")
    return checked


def engine_request(image: Image.Image, settings: InferenceSettings) -> EngineRequest:
    """The grounded generation serve-kosmos-2 runs for these settings (`<grounding>` added when missing)."""
    task = TaskInput(Task.RAW, prompt=settings.text_prompt or DEFAULT_TEXT_PROMPT, grounding=True)
    return EngineRequest(image, task, GenerationParams(max_new_tokens=settings.max_new_tokens))


def rectangle_object(class_title: str, box: tuple[int, int, int, int]) -> dict:
    """One box as a Supervisely rectangle label (`Label.to_json`); exterior is [[left, top], [right, bottom]].

    >>> rectangle_object("the blue circle", (132, 9, 225, 88))["points"]
    {'exterior': [[132, 9], [225, 88]], 'interior': []}
    """
    x1, y1, x2, y2 = box
    return {
        "classTitle": class_title,
        "description": "",
        "tags": [],
        "points": {"exterior": [[min(x1, x2), min(y1, y2)], [max(x1, x2), max(y1, y2)]], "interior": []},
        "geometryType": "rectangle",
        "shape": "rectangle",
        "nnCreated": True,
        "nnUpdated": True,
    }


def prediction(result: Result, classes: list[str] | str | None = None, name: str | None = None) -> dict:
    """A result as the SDK's prediction JSON: the annotation (caption as its description) and `data`, the /v1 answer.

    Each box of each grounded phrase is one object; `classes` (a list) keeps only those phrases.
    """
    width, height = result.image_size
    objects = [
        rectangle_object(entity.phrase, box)
        for entity in result.entities
        if entity.phrase.strip() and (not isinstance(classes, list) or entity.phrase in classes)
        for box in entity.pixel_boxes
    ]
    annotation = {"description": result.text, "size": {"height": height, "width": width}, "tags": [],
                  "objects": objects, "customBigData": {}}
    return {
        "source": None, "annotation": annotation, "name": name, "path": None, "url": None, "project_id": None,
        "dataset_id": None, "image_id": None, "video_id": None, "frame_index": None, "slides_data": {},
        "data": result.to_dict(),
    }


def _state(request: Request) -> ServiceState:
    return request.app.state.service


def _default_max_new_tokens(state: ServiceState) -> int:
    if state.engine is not None:
        return state.engine.defaults.max_new_tokens
    return state.engine_settings.max_new_tokens or BUILT_IN_DEFAULTS.max_new_tokens


async def _decode(state: ServiceState, upload: UploadFile, index: int, count: int) -> Image.Image:
    """The upload as an RGB image (pixel cap checked before decoding); errors name the file when there are several."""
    data = await upload.read()
    try:
        return await run_in_threadpool(functools.partial(load_image, data, max_pixels=state.engine_settings.max_image_pixels))
    except KosmosServeError as error:
        if count == 1:
            raise
        raise type(error)(f"files[{index}] ({upload.filename or 'no name'}): {error.message}") from None


def _one_state(settings: str, state: str) -> dict:
    """Inference.serve's rule: the `state` field when given, else the `settings` field (both hold a state)."""
    return read_state(settings if state in ("", "{}") else state)


@router.post("/get_session_info")
async def get_session_info(request: Request):
    state = _state(request)
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
    yaml = (
        "# text_prompt: a Kosmos-2 prompt; <grounding> is put in front when missing.\n"
        f"text_prompt: {json.dumps(DEFAULT_TEXT_PROMPT)}\n"
        f"max_new_tokens: {_default_max_new_tokens(_state(request))}\n"
    )
    return {"settings": yaml}


@router.post("/get_output_classes_and_tags")
@router.post("/get_model_meta")
async def get_output_classes_and_tags():
    """No fixed classes: each answer's phrases are its classes (the SDK's Session adds them from the annotation)."""
    return {"classes": [], "tags": [], "projectSettings": {"multiView": {"enabled": False, "tagName": None,
                                                                         "tagId": None, "isSynced": False}}}


@router.post("/is_deployed")
async def is_deployed(request: Request):
    # the key's colon is the SDK's own (Inference.serve's /is_deployed)
    return {"deployed": _state(request).batcher is not None, "description:": "Model is ready to receive requests"}


@router.post("/get_deploy_info")
async def get_deploy_info(request: Request):
    """The fields of the SDK's `DeployInfo` (supervisely/nn/utils.py)."""
    state = _state(request)
    state.ready_batcher()
    engine, model = state.engine, state.engine_settings.model
    dtype = str(engine.dtype).removeprefix("torch.")
    quantized = any(part.startswith("int8") for part in engine.model.weight_formats.values())
    precision = "INT8" if quantized else {"float16": "FP16", "bfloat16": "BF16"}.get(dtype, "FP32")
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
    service = _state(request)
    checked = inference_settings(_one_state(settings, state))
    if not files:
        raise InvalidRequestError("No image: send it as a multipart file part named `files` (curl -F files=@image.png).")
    if len(files) != 1:
        raise InvalidRequestError(
            f"Only one file expected but got {len(files)}; send several to {PREFIX}/inference_batch."
        )
    image = await _decode(service, files[0], 0, 1)
    result = await service.generate(engine_request(image, checked), functools.partial(client_gone, request))
    return prediction(result, checked.classes, files[0].filename)


@router.post("/inference_batch")
async def inference_batch(
    request: Request,
    files: Annotated[list[UploadFile] | None, File(description="The images, each a file part named `files`.")] = None,
    settings: Annotated[str, Form()] = "{}",
    state: Annotated[str, Form()] = "{}",
):
    """One prediction per file, in order; they reach the batcher a batch at a time."""
    service = _state(request)
    checked = inference_settings(_one_state(settings, state))
    if not files:
        raise InvalidRequestError("No images: send each as a multipart file part named `files` (curl -F files=@a.png).")
    images = [await _decode(service, upload, index, len(files)) for index, upload in enumerate(files)]
    gone = asyncio.ensure_future(client_gone(request))  # one listener for the whole batch
    results: list[Result] = []
    try:
        step = service.settings.max_batch_requests
        for start in range(0, len(images), step):
            chunk = [engine_request(image, checked) for image in images[start:start + step]]
            results += await asyncio.gather(*(service.generate(r, lambda: asyncio.shield(gone)) for r in chunk))
    finally:
        gone.cancel()
    return [prediction(result, checked.classes, upload.filename) for result, upload in zip(results, files)]


@router.post("/inference_image_url")
async def inference_image_url(request: Request):
    """`state.image_url`: fetched only from the hosts the service allows (KOSMOS_ALLOWED_IMAGE_HOSTS)."""
    service = _state(request)
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise InvalidRequestError('The body is not JSON; send {"state": {"image_url": "https://..."}}.') from None
    state = body.get("state") if isinstance(body, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("image_url"), str) or not state["image_url"]:
        raise InvalidRequestError('state.image_url is missing; send {"state": {"image_url": "https://..."}}.')
    checked = inference_settings(state)
    data = await service.image_bytes(state["image_url"])
    image = await run_in_threadpool(functools.partial(load_image, data, max_pixels=service.engine_settings.max_image_pixels))
    result = await service.generate(engine_request(image, checked), functools.partial(client_gone, request))
    return prediction(result, checked.classes)


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
        return error_response(405, f"{PREFIX}/{endpoint} takes POST, as the Supervisely SDK sends it.")
    served = ", ".join(SERVED)
    return error_response(404, f"{PREFIX}/{endpoint} is not served here; kosmos-serve serves {served}.")
