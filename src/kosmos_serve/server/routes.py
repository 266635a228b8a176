"""Routes: the reference's `POST /predict` and the `/v1/generate` JSON API."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from PIL import Image
from starlette.concurrency import run_in_threadpool

from kosmos_serve.engine import Request as EngineRequest
from kosmos_serve.engine import Result
from kosmos_serve.errors import InvalidRequestError, KosmosServeError
from kosmos_serve.generation import GenerationParams
from kosmos_serve.server.common import MIN_SCORE_DESCRIPTION, MinScoreField, client_gone, decode_image, service_state
from kosmos_serve.server.schemas import (
    GenerateForm,
    GenerateJSON,
    GenerateResponse,
    GenerationFields,
    PixelBoxInput,
    PredictResponse,
    predict_body,
    response_body,
)
from kosmos_serve.server.state import ServiceState
from kosmos_serve.tasks import Task, TaskInput

logger = logging.getLogger("kosmos_serve.server")
router = APIRouter()

ERRORS = {
    status: {"description": description, "content": {"application/json": {"example": {"error": example}}}}
    for status, description, example in [
        (400, "Not an image, or a truncated one", {"code": "invalid_image", "message": "The upload is not an image."}),
        (413, "Upload or image too large", {"code": "image_too_large", "message": "The image has 64000000 pixels..."}),
        (422, "Bad parameters or boxes", {"code": "invalid_box", "message": "Box 1 is outside the 640x480 image."}),
        (503, "Model loading or queue full (Retry-After)", {"code": "service_busy", "message": "The queue is full..."}),
        (504, "Took longer than the request time limit", {"code": "timeout", "message": "The request took longer..."}),
    ]
}
SSE_DOC = {"description": "With `stream: true`: events `text` ({\"text\": ...}) as generated, then `result`.",
           "content": {"text/event-stream": {}}}


@router.post(
    "/predict", response_model=PredictResponse, tags=["drop-in"], responses=ERRORS,
    summary="The reference service's route: multipart `content` (image) and optional `prompt`.",
    description=(
        "Drop-in for mindthemath/kosmos-2-api. The prompt is used as given (default `DEFAULT_PROMPT`, "
        "`<grounding> Describe this image:`). Added to the reference's answer: `scores`, each entity's box scores "
        "(the entities keep the reference's shape); and an optional form field `min_score`. A model that runs no "
        "prompts of its own (Kosmos-2.5) answers 422, pointing to `/v1/generate`.\n\n"
        "`curl -F content=@snowman.png --form-string 'prompt=<grounding> An image of' http://127.0.0.1:8000/predict`"
    ),
)
async def predict(
    request: Request,
    content: Annotated[UploadFile, File(description="The image file.")],
    prompt: Annotated[str | None, Form(description="Prompt; `<grounding>` where boxes are wanted.")] = None,
    min_score: Annotated[MinScoreField | None, Form(description=f"(Added) {MIN_SCORE_DESCRIPTION}")] = None,
):
    state = service_state(request)
    _refuse_unless_prompted(state)
    image = await decode_image(state, await content.read())
    task = TaskInput("raw", prompt or state.default_prompt, grounding=False)
    params = GenerationParams(min_score=min_score)
    result = await state.generate(EngineRequest(image, task, params), functools.partial(client_gone, request))
    return predict_body(result)


def _refuse_unless_prompted(state: ServiceState) -> None:
    """`/predict` sends a prompt as it is (task raw): a model whose family runs no such task is told where to go."""
    engine = state.engine
    if engine is not None and Task.RAW not in engine.family.tasks:
        tasks = " or ".join(f"'{task.value}'" for task in engine.family.tasks)
        raise InvalidRequestError(
            f"POST /predict is the reference Kosmos-2 service's route (an image and a prompt, grounded text back); "
            f"this service runs a {engine.family.name} model, which takes no prompt of its own. "
            f"Send the image to POST /v1/generate (or /v1/generate/upload) with task {tasks}.")


@router.post(
    "/v1/generate", response_model=GenerateResponse, tags=["v1"], responses={**ERRORS, 200: SSE_DOC},
    summary="Run any task on a base64 image (JSON); `stream: true` answers as server-sent events.",
)
async def generate_json(request: Request, body: GenerateJSON):
    state = service_state(request)
    image = await decode_image(state, await state.image_bytes(body.image))
    return await _generate(request, image, body, body.boxes)


@router.post(
    "/v1/generate/upload", response_model=GenerateResponse, tags=["v1"], responses={**ERRORS, 200: SSE_DOC},
    summary="Run any task on an uploaded image (multipart: file `image`, the other fields as form fields).",
    description=(
        "`curl -F image=@shapes.png -F task=referring_comprehension -F 'phrases=the red circle' "
        "http://127.0.0.1:8000/v1/generate/upload`; repeat `phrases` for several; `boxes` is JSON text."
    ),
)
async def generate_upload(request: Request, fields: Annotated[GenerateForm, Form(media_type="multipart/form-data")]):
    state = service_state(request)
    decoded = await decode_image(state, await fields.image.read())
    return await _generate(request, decoded, fields, fields.boxes)


async def _generate(http_request: Request, image: Image.Image, fields: GenerationFields, boxes: list[PixelBoxInput]):
    state = service_state(http_request)
    request = EngineRequest(image, fields.task_input(boxes), fields.params())
    if fields.stream:
        return _stream(state, request, fields.return_image, functools.partial(client_gone, http_request))
    result = await state.generate(request, functools.partial(client_gone, http_request))
    # drawing and PNG encoding stay off the event loop:
    return JSONResponse(await run_in_threadpool(response_body, result, image if fields.return_image else None))


def _stream(
    state: ServiceState, request: EngineRequest, return_image: bool, gone: Callable[[], Awaitable[None]]
) -> EventSourceResponse:
    pieces = state.stream(request, gone)  # validated and queued now: 422 or 503 before the stream

    async def events() -> AsyncIterator[bytes]:
        try:
            async for piece in pieces:
                if isinstance(piece, Result):
                    body = await run_in_threadpool(response_body, piece, request.image if return_image else None)
                    yield format_sse_event(event="result", data_str=json.dumps(body))
                else:
                    yield format_sse_event(event="text", data_str=json.dumps({"text": piece}))
        except KosmosServeError as error:
            yield format_sse_event(event="error", data_str=json.dumps({"code": error.code, "message": error.message}))
        except Exception:
            logger.exception("Streaming failed")
            internal = {"code": "internal_error", "message": "Internal error."}
            yield format_sse_event(event="error", data_str=json.dumps(internal))
        finally:
            await pieces.aclose()

    return EventSourceResponse(events())
