"""The OpenAI Chat Completions wire format as vLLM serves it: request and response bodies, and the error body.

Unknown fields are ignored (and logged), as vLLM and OpenAI do, so any OpenAI client's extra options pass; one
extra of kosmos-serve's own, `min_score`, is read (the SDK sends it through `extra_body`).
The decoding fields reuse the engine's ranges (`kosmos_serve.generation`), so OpenAPI declares what is
valid; `temperature` adds 0, which means greedy decoding.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kosmos_serve.errors import KosmosServeError, UnauthorizedError
from kosmos_serve.generation import MaxNewTokens, Seed, TopP
from kosmos_serve.server.common import SCORES_DESCRIPTION, MinScoreField
from kosmos_serve.server.errors import ErrorAnswer, ErrorFormat

MAX_CHOICES = 8  # the most choices (`n`) one request may ask for: each is a generation of its own
MIN_SAMPLING_TEMPERATURE = 0.01  # the engine's lower bound (kosmos_serve.generation.Temperature)
OPENAI_PATHS = ("/v1/chat/", "/v1/models")
INTERNAL_ERROR_MESSAGE = "Internal error; the service log has the details (see the X-Request-ID header)."
# The service's own codes under OpenAI's names where OpenAI has one.
_OPENAI_CODES = {UnauthorizedError.code: "invalid_api_key"}
# OpenAI (and vLLM) answer every bad request with 400; the service's 422s are that here.
_OPENAI_STATUS = {422: 400}
# Retrying these cannot help (a busy queue can: the SDK retries 503 service_busy, honouring Retry-After).
_NOT_RETRYABLE = {"model_unavailable", "timeout", "internal_error"}


class OpenAIModel(BaseModel):
    """Fields OpenAI defines and kosmos-serve does not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")


class ImageURL(OpenAIModel):
    url: str = Field(description="The image as a `data:image/...;base64,...` URI; an http(s) URL only from a host "
                                 "in KOSMOS_ALLOWED_IMAGE_HOSTS (by default the service fetches nothing).")
    detail: str | None = Field(None, description="Accepted and unused: Kosmos-2 always sees the image at 224x224.")


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ImagePart(OpenAIModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = Field(
        None, description="Text, or parts: text parts and, in one message of the conversation, one image_url part.",
    )


class StreamOptions(OpenAIModel):
    include_usage: bool = Field(False, description="Send a last chunk with the request's token usage.")


class ChatCompletionRequest(OpenAIModel):
    """`POST /v1/chat/completions`: one image and a question (or Kosmos-2 prompt) about it."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation; the last one must be the user's.")
    model: str | None = Field(None, description="The served model's id (GET /v1/models); omitted: that model.")
    max_tokens: MaxNewTokens | None = Field(None, description="Deprecated by OpenAI for `max_completion_tokens`.")
    max_completion_tokens: MaxNewTokens | None = Field(
        None, description="New tokens at most (up to KOSMOS_MAX_NEW_TOKENS_CAP); omitted: the model's default.",
    )
    temperature: float | None = Field(
        None, ge=0, le=100, allow_inf_nan=False,
        description="0 or omitted: greedy decoding (the original demo's); 0.01 to 100: sampling at that temperature.",
    )
    top_p: TopP | None = Field(None, description="Nucleus sampling when sampling (default 1); unused when greedy.")
    seed: Seed | None = Field(None, description="Seed of choice 0 when sampling; choice i uses seed + i.")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices; more than 1 only when sampling (temperature > 0).")
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="Cut the answer before the first of these strings (not included).",
    )
    stream: bool = Field(False, description="Answer as server-sent `chat.completion.chunk` events, then [DONE].")
    stream_options: StreamOptions | None = None
    min_score: MinScoreField | None = Field(
        None, description="Not OpenAI's (the SDK sends it in `extra_body`): drop boxes scored under this (0..1) from "
                          "`entities` and the links of `content`; an entity left with no box is plain text. "
                          "Omitted: every box is kept.",
    )

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "model": "demo",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<grounding><phrase> the blue circle</phrase>"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo..."}},
        ]}],
        "max_tokens": 64,
    }]})

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampling(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_SAMPLING_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or between {MIN_SAMPLING_TEMPERATURE} and 100")
        return value

    @property
    def sampling(self) -> bool:
        """Sampling, rather than greedy decoding: a temperature above 0 was sent."""
        return bool(self.temperature)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class EntityOut(BaseModel):
    phrase: str
    boxes: list[tuple[float, float, float, float]] = Field(description="Normalised to 0..1.")
    pixel_boxes: list[tuple[int, int, int, int]] = Field(description="In the image's own pixels, [x1, y1, x2, y2].")
    scores: list[float] = Field(description=SCORES_DESCRIPTION)


class LineOut(BaseModel):
    text: str
    corners: list[tuple[int, int]] = Field(description="The box's corners, clockwise from the top left, in pixels.")
    box: tuple[int, int, int, int] = Field(description="[x1, y1, x2, y2] in the image's own pixels.")
    score: float = Field(description="How sure the model was of the line's box and text, in [0, 1].")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = Field(description="The answer in the paper's markdown: each grounded phrase a link to its pixel "
                                     "boxes, `[a blue circle](#box=132,9,225,94)`.")
    entities: list[EntityOut] = Field(description="The grounded phrases of `content`, with their boxes.")
    lines: list[LineOut] | None = Field(None, description="Kosmos-2.5's `ocr` only: every line read, as "
                                                          "`/v1/generate` gives it; `content` is their text.")


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="The prompt as the model reads it: <s>, the 64 image positions between "
                                           "<image> and </image>, and the prompt's text tokens.")
    completion_tokens: int = Field(description="Tokens generated, over all choices.")
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "chatcmpl-0f6e3d9a4c2b4f1e8a7d5c3b1a9e7f5d", "object": "chat.completion", "created": 1767225600,
        "model": "demo",
        "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "[the blue circle](#box=132,9,225,88)",
            "entities": [{"phrase": "the blue circle", "boxes": [[0.578125, 0.046875, 0.984375, 0.453125]],
                          "pixel_boxes": [[132, 9, 225, 88]], "scores": [0.93]}],
        }, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 75, "completion_tokens": 5, "total_tokens": 80},
    }]})


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kosmos-serve"
    max_model_len: int = Field(description="Kosmos-2's text context, in tokens.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str = Field(description="OpenAI's error type: invalid_request_error, or server_error for 5xx.")
    param: str | None = Field(None, description="The request field at fault, e.g. `messages[0].content`.")
    code: str = Field(description="What went wrong: model_not_found, invalid_api_key, invalid_image, ...")


class ErrorResponse(BaseModel):
    error: ErrorInfo


# --- errors -----------------------------------------------------------------------------------------------


class ChatRequestError(KosmosServeError):
    """A request the OpenAI-compatible API cannot serve; `param` names the field at fault."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelNotFoundError(ChatRequestError):
    """The request names a model this service does not serve."""

    status = 404
    code = "model_not_found"


def is_openai_path(path: str) -> bool:
    """Whether `path` belongs to the OpenAI-compatible API (whose errors take OpenAI's shape)."""
    return path.startswith(OPENAI_PATHS)


def render_error(answer: ErrorAnswer, request: Request) -> JSONResponse:
    """An error in OpenAI's shape; 5xx errors that a retry cannot fix say so (`x-should-retry: false`)."""
    status = _OPENAI_STATUS.get(answer.status, answer.status)
    code = _OPENAI_CODES.get(answer.code, answer.code)
    message, param = answer.message, answer.param
    if answer.problems is not None:
        cap = request.app.state.service.engine_settings.max_new_tokens_cap
        message, param = describe_problems(list(answer.problems), cap)
    if code == "internal_error":
        message = INTERNAL_ERROR_MESSAGE
    headers = dict(answer.headers)
    if code in _NOT_RETRYABLE:
        headers["x-should-retry"] = "false"
    error_type = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": error_type, "param": param, "code": code}}, status,
                        headers=headers)


# The engine's inputs by the request's own fields (`min_score`: the SDK's extra_body); `max_new_tokens` and the
# prompt are named by `translate.refusal`, which knows the field the request sent and the message it came from.
REQUEST_FIELDS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "min_score": "min_score"}
ERROR_FORMAT = ErrorFormat(owns=is_openai_path, render=render_error, names=REQUEST_FIELDS)


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

