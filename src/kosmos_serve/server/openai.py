"""OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`, in vLLM's wire format.

A chat request becomes one Kosmos-2 task on the conversation's one image, through the same batcher,
limits, key, image cache and metrics as every other route:

| the last user message's text              | task                 | prompt sent                                     |
| ----------------------------------------- | -------------------- | ----------------------------------------------- |
| none                                      | brief caption        | `<grounding> An image of`                       |
| has Kosmos-2 tags (`<grounding>`, ...)    | raw, as it is        | the text, unchanged                             |
| plain words (`What is red?`)              | grounded VQA         | `<grounding> Question: What is red? Answer:`    |

The answer (`message.content`) is the paper's markdown: each grounded phrase a link to its pixel boxes.
It is the model's clean text as `POST /predict` gives it (a caption keeps its `An image of`), except
that a question's answer is given without the `Question: ... Answer:` frame. Errors on these routes
are OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kosmos_serve.engine import PreparedRequest, Result
from kosmos_serve.engine import Request as EngineRequest
from kosmos_serve.errors import KosmosServeError, ServiceBusyError, UnauthorizedError
from kosmos_serve.generation import MAX_NEW_TOKENS_LIMIT
from kosmos_serve.grounding import parse_generation
from kosmos_serve.images import load_image
from kosmos_serve.server.openai_schemas import (
    ChatAnswer,
    ChatCompletion,
    ChatCompletionRequest,
    ChatRequestError,
    ErrorResponse,
    ModelCard,
    ModelList,
    chat_answer,
    generation_params,
    read_conversation,
    settled_prefix,
    task_for_text,
)
from kosmos_serve.server.state import ServiceState
from kosmos_serve.tasks import Task

logger = logging.getLogger("kosmos_serve.server")

OPENAI_PATHS = ("/v1/chat/", "/v1/models")
STARTED = int(time.time())  # the `created` of the served model


def is_openai_path(path: str) -> bool:
    """Whether `path` belongs to the OpenAI-compatible API (whose errors take OpenAI's shape)."""
    return path.startswith(OPENAI_PATHS)


# --- errors -----------------------------------------------------------------------------------------------


class ModelNotFoundError(ChatRequestError):
    status = 404
    code = "model_not_found"


# The service's own codes under OpenAI's names where OpenAI has one.
_OPENAI_CODES = {UnauthorizedError.code: "invalid_api_key"}
# OpenAI (and vLLM) answer every bad request with 400; the service's 422s are that here.
_OPENAI_STATUS = {422: 400}
# Retrying these cannot help (a busy queue can: the SDK retries 503 service_busy, honouring Retry-After).
_NOT_RETRYABLE = {"model_unavailable", "timeout", "internal_error"}


def openai_error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error in OpenAI's shape; 5xx errors that a retry cannot fix say so (`x-should-retry: false`)."""
    status = _OPENAI_STATUS.get(status, status)
    code = _OPENAI_CODES.get(code, code)
    error_type = "server_error" if status >= 500 else "invalid_request_error"
    headers = dict(headers or {})
    if code in _NOT_RETRYABLE:
        headers["x-should-retry"] = "false"
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status, headers=headers)


def openai_error(error: KosmosServeError, headers: dict[str, str] | None = None) -> JSONResponse:
    """A domain error in OpenAI's shape (503s keep their Retry-After)."""
    if isinstance(error, ServiceBusyError):
        headers = {**(headers or {}), "Retry-After": str(error.retry_after)}
    return openai_error_response(error.status, error.code, error.message, getattr(error, "param", None), headers)


def openai_http_error(status: int, detail: str) -> JSONResponse:
    """Starlette's 404 / 405 on these paths, in OpenAI's shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    return openai_error_response(status, code, detail)


def describe_problems(problems: list[dict], max_new_tokens_cap: int | None = None) -> tuple[str, str | None]:
    """Pydantic's errors as one message for people and the first field at fault (`param`).

    >>> describe_problems([{"loc": ("body", "messages", 0, "role"), "msg": "Input should be 'user'", "type": "x"}])
    ("messages[0].role: Input should be 'user'.", 'messages[0].role')
    """
    problems = [p for p in problems if not _shadowed_union_branch(p, problems)]
    lines, params = [], []
    for problem in problems:
        param = _param(problem.get("loc", ()))
        message = problem["msg"]
        kind = problem.get("type")
        if kind == "json_invalid":
            param, message = None, "The body is not valid JSON"
        elif param is None and kind in ("missing", "model_attributes_type", "dict_type"):
            message = "The body must be a JSON object with `messages` (Content-Type: application/json)"
        elif kind == "list_type" and param and param.endswith(".content"):
            message = "must be a string or a list of content parts ({type: text} or {type: image_url})"
        elif kind == "union_tag_not_found":
            message = "a content part needs a `type`: text or image_url"
        elif kind == "less_than_equal" and param in ("max_tokens", "max_completion_tokens") and max_new_tokens_cap:
            message = f"must be at most {max_new_tokens_cap} (KOSMOS_MAX_NEW_TOKENS_CAP)"
        message = message.removeprefix("Value error, ")
        lines.append(f"{param}: {message}" if param else message)
        params.append(param)
    return "; ".join(lines) + ".", next((p for p in params if p), None)


def _shadowed_union_branch(problem: dict, problems: list[dict]) -> bool:
    """A `str` branch error of `content` when the list branch has its own, more telling, error."""
    loc = problem.get("loc", ())
    if not loc or loc[-1] != "str":
        return False
    return any(other is not problem and other["loc"][: len(loc) - 1] == loc[:-1] for other in problems)


def _param(loc: tuple) -> str | None:
    """A pydantic location as a field path, without union branch names: `messages[0].content[1].type`."""
    path, tag_next = "", False
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "body" and not path:
            continue
        elif part == "str" or "[" in part or part[:1].isupper():  # a union branch, not a field
            tag_next = "tagged-union" in part
            continue
        elif tag_next:  # a tagged union's item: its tag (`image_url`) comes before its fields
            tag_next = False
        else:
            path += f".{part}" if path else part
    return path or None


class OpenAIRoute(APIRoute):
    """A route whose every error, request validation included, answers in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Awaitable]:
        handle = super().get_route_handler()

        async def handle_with_openai_errors(request: Request):
            try:
                return await handle(request)
            except RequestValidationError as error:
                cap = request.app.state.service.engine_settings.max_new_tokens_cap
                message, param = describe_problems(list(error.errors()), cap)
                return openai_error_response(400, "invalid_request", message, param)
            except KosmosServeError as error:
                return openai_error(error)
            except StarletteHTTPException as error:
                return openai_http_error(error.status_code, str(error.detail))
            except Exception:
                logger.exception("Unhandled error")
                message = "Internal error; the service log has the details (see the X-Request-ID header)."
                return openai_error_response(500, "internal_error", message)

        return handle_with_openai_errors


router = APIRouter(route_class=OpenAIRoute, tags=["openai"])
ERRORS = {status: {"model": ErrorResponse, "description": description} for status, description in [
    (400, "Bad request (no image, two images, a field out of range, ...): OpenAI's error shape"),
    (401, "The API key is missing or wrong"),
    (404, "No such model"),
    (413, "Upload or image too large"),
    (503, "Model loading or queue full (Retry-After)"),
]}


@dataclass(frozen=True)
class Choice:
    """One generation of the request: its engine request, and how to read its result."""

    request: PreparedRequest
    question: bool
    stop: tuple[str, ...]

    @property
    def prompt(self) -> str:
        """The prompt text the model is sent."""
        return self.request.prompts[0].text

    @property
    def max_new_tokens(self) -> int:
        """With the model's default filled in: reaching it means finish_reason "length"."""
        return self.request.params.max_new_tokens

    def answer(self, result: Result) -> ChatAnswer:
        return chat_answer(result.text, result.answer, result.entities, question=self.question, stop=self.stop)

    def finish_reason(self, result: Result, answer: ChatAnswer) -> str:
        return "length" if not answer.stopped and result.generated_tokens >= self.max_new_tokens else "stop"


# --- routes -----------------------------------------------------------------------------------------------


def _state(request: Request) -> ServiceState:
    return request.app.state.service


def _model_card(state: ServiceState) -> dict:
    return {"id": state.engine_settings.model, "object": "model", "created": STARTED, "owned_by": "kosmos-serve",
            "max_model_len": MAX_NEW_TOKENS_LIMIT}


@router.get("/v1/models", response_model=ModelList, responses=ERRORS,
            summary="The served model (OpenAI's model list); 503 until it is loaded.")
async def list_models(request: Request):
    state = _state(request)
    state.ready_batcher()
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERRORS, summary="One model by its id.")
async def retrieve_model(request: Request, model: str):
    state = _state(request)
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
        "`[a blue circle](#box=132,9,225,94)`; `message.entities` lists them. Omitted temperature or 0: greedy."
    ),
)
async def chat_completions(request: Request, body: ChatCompletionRequest):
    state = _state(request)
    ignored = sorted(set(body.model_extra or {}))
    if ignored:
        logger.info("Ignored fields of a chat completion request: %s", ", ".join(ignored))
    _check_model(state, body.model)
    url, image_param, text = read_conversation(body.messages, state.engine_settings.max_prompt_chars)
    task = task_for_text(text)
    all_params = generation_params(body, state.engine_settings.max_new_tokens_cap)
    batcher = state.ready_batcher()
    image = await _read_image(state, url, image_param)
    choices = [Choice(state.prepare(EngineRequest(image, task, params)), task.task is Task.GROUNDED_VQA,
                      body.stop_strings) for params in all_params]  # a prompt too long is a 400 here
    prompt_tokens, decoded_prompt = await run_in_threadpool(state.engine.prompt_reader.read, choices[0].prompt)
    completion = _Completion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.engine_settings.model,
                             prompt_tokens)
    gone = _SharedWatch(functools.partial(_client_gone, request))
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        first = batcher.stream(choices[0].request, gone)  # queued now: a full queue is a 503 before the stream
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
        data = await state.image_bytes(url)
        return await run_in_threadpool(
            functools.partial(load_image, data, max_pixels=state.engine_settings.max_image_pixels))
    except KosmosServeError as error:
        error.param = param
        raise


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _SharedWatch:
    """One watcher of the client's disconnection, shared by a request's several generations."""

    def __init__(self, client_gone: Callable[[], Awaitable[None]]):
        self._client_gone = client_gone
        self._task: asyncio.Task | None = None

    async def __call__(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._client_gone())
        await asyncio.shield(self._task)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def _generate_all(state: ServiceState, requests: list[PreparedRequest], gone: _SharedWatch) -> list[Result]:
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


@dataclass(frozen=True)
class _Completion:
    """What every body of one completion shares."""

    id: str
    created: int
    model: str
    prompt_tokens: int

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def response(self, choices: list[Choice], results: list[Result]) -> dict:
        body_choices = []
        for index, (choice, result) in enumerate(zip(choices, results)):
            answer = choice.answer(result)
            message = {"role": "assistant", "content": answer.content, "entities": answer.entities_json()}
            body_choices.append({"index": index, "message": message, "logprobs": None,
                                 "finish_reason": choice.finish_reason(result, answer)})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": body_choices, "usage": self.usage(sum(r.generated_tokens for r in results))}

    def chunk(self, choices: list[dict], usage: dict | None = None, include_usage: bool = False) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}
        if include_usage:
            body["usage"] = usage  # OpenAI: null on every chunk but the last, which has no choices
        return f"data: {json.dumps(body)}\n\n".encode()


async def _stream(
    state: ServiceState, completion: _Completion, choices: list[Choice], first: AsyncIterator[str | Result],
    decoded_prompt: str, gone: _SharedWatch, include_usage: bool,
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
                pieces = state.ready_batcher().stream(choice.request, gone)
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
                        yield chunk(index, {"entities": answer.entities_json()}, choice.finish_reason(piece, answer))
                        completion_tokens += piece.generated_tokens
                        break
                    generated += piece
                    partial = _partial_answer(choice, decoded_prompt, generated)
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


def _partial_answer(choice: Choice, decoded_prompt: str, generated: str) -> str | None:
    """The answer's content as far as the generation so far settles it (None: nothing can be shown yet).

    The pieces are decoded apart from the prompt, so when they begin with a word rather than a tag or a
    space, only the result tells whether a space joins that word to the prompt's last one; a question's
    answer leaves the prompt's words out, so there it does not matter.
    """
    if not choice.question and generated and not (generated[0] == "<" or generated[0].isspace()):
        return None
    grounded = parse_generation(settled_prefix(decoded_prompt + generated), choice.prompt,
                                *choice.request.request.image.size)
    return chat_answer(grounded.text, grounded.answer, grounded.entities, question=choice.question, stop=choice.stop,
                       partial=True).content


def _stream_error(status: int, code: str, message: str) -> bytes:
    error_type = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n".encode()
