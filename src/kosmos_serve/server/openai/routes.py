"""The OpenAI-compatible routes: the model list, and chat completions whole or streamed as OpenAI's chunks."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from kosmos_serve.engine import PreparedRequest, Result
from kosmos_serve.engine import Request as EngineRequest
from kosmos_serve.errors import InvalidRequestError, KosmosServeError
from kosmos_serve.generation import MAX_NEW_TOKENS_LIMIT
from kosmos_serve.server.common import DisconnectWatch, decode_image, service_state
from kosmos_serve.server.errors import AnsweringRoute
from kosmos_serve.server.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    ModelNotFoundError,
)
from kosmos_serve.server.openai.translate import (
    Choice,
    Completion,
    extra_fields,
    generation_params,
    read_conversation,
    refusal,
    task_for_text,
)
from kosmos_serve.server.state import ServiceState
from kosmos_serve.tasks import Task

logger = logging.getLogger("kosmos_serve.server")

STARTED = int(time.time())  # the `created` of the served model
router = APIRouter(route_class=AnsweringRoute, tags=["openai"])
ERRORS = {status: {"model": ErrorResponse, "description": description} for status, description in [
    (400, "Bad request (no image, two images, a field out of range, ...): OpenAI's error shape"),
    (401, "The API key is missing or wrong"),
    (404, "No such model"),
    (413, "Upload or image too large"),
    (503, "Model loading or queue full (Retry-After)"),
]}


def _model_card(state: ServiceState) -> dict:
    return {"id": state.engine_settings.model, "object": "model", "created": STARTED, "owned_by": "kosmos-serve",
            "max_model_len": MAX_NEW_TOKENS_LIMIT}


@router.get("/v1/models", response_model=ModelList, responses=ERRORS,
            summary="The served model (OpenAI's model list); 503 until it is loaded.")
async def list_models(request: Request):
    state = service_state(request)
    state.ready_batcher()
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERRORS, summary="One model by its id.")
async def retrieve_model(request: Request, model: str):
    state = service_state(request)
    state.ready_batcher()
    _check_model(state, model)
    return _model_card(state)


def _check_model(state: ServiceState, model: str | None) -> None:
    served = state.engine_settings.model
    if model is not None and model != served:
        raise ModelNotFoundError(f"The model `{model}` does not exist; this service serves `{served}` "
                                 "(GET /v1/models).", "model")


@router.post(
    "/v1/chat/completions", response_model=ChatCompletion, responses={
        **ERRORS, 200: {"description": "`chat.completion`, or with `stream: true` server-sent "
                                       "`chat.completion.chunk` events ending in `data: [DONE]`.",
                        "content": {"text/event-stream": {}}}},
    summary="OpenAI-compatible chat completion on one image: a caption, a grounded answer, or a Kosmos-2 prompt.",
    description=(
        "The last user message's text picks the task: none: a brief grounded caption; Kosmos-2 tags "
        "(`<grounding>`, `<phrase>`, ...): sent as it is; plain words: a grounded question "
        "(`<grounding> Question: ... Answer:`). `message.content` links each grounded phrase to its pixel boxes, "
        "`[a blue circle](#box=132,9,225,94)`; `message.entities` lists them, each box with its score. Omitted "
        "temperature or 0: greedy. `min_score` (not OpenAI's; the SDK's `extra_body`) drops boxes scored under it. "
        "On a Kosmos-2.5: no text or a request to read (`read this`): `ocr`, the lines in `content` and with their "
        "boxes and scores in `message.lines`; `<md>`: markdown; other words: a `question` (Kosmos-2.5-chat only)."
    ),
)
async def chat_completions(request: Request, body: ChatCompletionRequest):
    state = service_state(request)
    ignored = sorted(set(body.model_extra or {}))
    if ignored:
        logger.info("Ignored fields of a chat completion request: %s", ", ".join(ignored))
    _check_model(state, body.model)
    url, image_param, text = read_conversation(body.messages)
    all_params = generation_params(body)
    state.ready_batcher()  # a 503 before any image is fetched
    task = task_for_text(text, state.engine.family.tasks)
    image = await _read_image(state, url, image_param)
    try:  # the engine checks each choice (a prompt too long, too many tokens: a 400 here)
        choices = [Choice(state.prepare(EngineRequest(image, task, params)), task.task is Task.GROUNDED_VQA,
                          body.stop_strings) for params in all_params]
    except InvalidRequestError as error:
        raise refusal(error, body, text, state.engine_settings) from None
    prompt_tokens, decoded_prompt = await run_in_threadpool(state.engine.prompt_reader.read, choices[0].prompt)
    completion = Completion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.engine_settings.model,
                            prompt_tokens)
    gone = DisconnectWatch(request)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        first = state.stream(choices[0].request, gone)  # queued now: a full queue is a 503 before the stream
        events = _stream(state, completion, choices, first, decoded_prompt, gone, include_usage)
        return EventSourceResponse(events, headers={"Cache-Control": "no-cache"})
    try:
        results = await _generate_all(state, [choice.request for choice in choices], gone)
    finally:
        gone.close()
    return JSONResponse(completion.response(choices, results))


async def _read_image(state: ServiceState, url: str, param: str) -> Image.Image:
    """The image a data: URI carries, or that an allowed host serves; errors name the part they come from."""
    try:
        return await decode_image(state, await state.image_bytes(url))
    except KosmosServeError as error:
        error.param = param
        raise


async def _generate_all(state: ServiceState, requests: list[PreparedRequest], gone: DisconnectWatch) -> list[Result]:
    """Run the choices concurrently; the first failure cancels the rest (dropped if still queued)."""
    tasks = [asyncio.ensure_future(state.generate(engine_request, gone)) for engine_request in requests]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a sibling's failure is reported once, by gather


async def _stream(
    state: ServiceState, completion: Completion, choices: list[Choice], first: AsyncIterator[str | Result],
    decoded_prompt: str, gone: DisconnectWatch, include_usage: bool,
) -> AsyncIterator[bytes]:
    """The choices one after another: the role, content deltas as the answer settles, the finish; usage; [DONE]."""

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return completion.chunk([choice], include_usage=include_usage)

    completion_tokens = 0
    pieces = first
    try:
        for index, choice in enumerate(choices):
            if index > 0:
                pieces = state.stream(choice.request, gone)
            yield chunk(index, {"role": "assistant", "content": ""})
            generated, shown = "", ""
            try:
                async for piece in pieces:
                    if isinstance(piece, Result):
                        answer = choice.answer(piece)
                        if not answer.content.startswith(shown):  # cannot happen: shown is always settled
                            logger.warning("A streamed answer diverged from its result; the rest is not sent.")
                        elif answer.content != shown:
                            yield chunk(index, {"content": answer.content[len(shown):]})
                        yield chunk(index, extra_fields(piece, answer), choice.finish_reason(piece, answer))
                        completion_tokens += piece.generated_tokens
                        break
                    generated += piece
                    partial = choice.partial_answer(decoded_prompt, generated)
                    if partial is not None and partial.startswith(shown) and partial != shown:
                        yield chunk(index, {"content": partial[len(shown):]})
                        shown = partial
            finally:
                await pieces.aclose()
        if include_usage:
            yield completion.chunk([], completion.usage(completion_tokens), include_usage=True)
    except KosmosServeError as error:
        yield _stream_error(error.status, error.code, error.message)
    except Exception:
        logger.exception("Streaming failed")
        yield _stream_error(500, "internal_error", "Internal error; the service log has the details.")
    finally:
        gone.close()
    yield b"data: [DONE]\n\n"


def _stream_error(status: int, code: str, message: str) -> bytes:
    """An error after the stream began, as OpenAI sends one: a `data:` event with the error body."""
    error_type = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n".encode()
