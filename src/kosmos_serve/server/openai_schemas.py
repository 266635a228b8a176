"""The OpenAI Chat Completions wire format as vLLM serves it, and its translation to a Kosmos-2 task and back.

Unknown fields are ignored (and logged), as vLLM and OpenAI do, so any OpenAI client's extra options pass.
The decoding fields reuse the engine's ranges (`kosmos_serve.generation`), so OpenAPI declares what is
valid; `temperature` adds 0, which means greedy decoding.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kosmos_serve.errors import KosmosServeError
from kosmos_serve.generation import GenerationParams, MaxNewTokens, Seed, TopP
from kosmos_serve.grounding import Entity, render_markdown
from kosmos_serve.tasks import Task, TaskInput

MAX_CHOICES = 8  # the most choices (`n`) one request may ask for: each is a generation of its own
MIN_SAMPLING_TEMPERATURE = 0.01  # the engine's lower bound (kosmos_serve.generation.Temperature)
SAMPLING_TOP_P = 1.0  # OpenAI's and vLLM's default when a request samples without a top_p
KOSMOS_TAG = re.compile(r"</?(?:grounding|phrase|object)>|<patch_index_\d+>|</delimiter_of_multi_objects/>")


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = Field(description="The answer in the paper's markdown: each grounded phrase a link to its pixel "
                                     "boxes, `[a blue circle](#box=132,9,225,94)`.")
    entities: list[EntityOut] = Field(description="The grounded phrases of `content`, with their boxes.")


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
                          "pixel_boxes": [[132, 9, 225, 88]]}],
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


class ChatRequestError(KosmosServeError):
    """A request the OpenAI-compatible API cannot serve; `param` names the field at fault."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# --- conversation -> Kosmos-2 task --------------------------------------------------------------------------


def task_for_text(text: str) -> TaskInput:
    """The Kosmos-2 task for the user's words: none -> caption, Kosmos-2 tags -> as it is, else a grounded question.

    >>> task_for_text("  ").task, task_for_text("What is red?").prompt
    (<Task.CAPTION: 'caption'>, 'What is red?')
    >>> tagged = task_for_text("<grounding><phrase> the red circle</phrase>")
    >>> tagged.task, tagged.prompt, tagged.grounding
    (<Task.RAW: 'raw'>, '<grounding><phrase> the red circle</phrase>', False)
    """
    text = text.strip()
    if not text:
        return TaskInput(Task.CAPTION)
    if KOSMOS_TAG.search(text):
        return TaskInput(Task.RAW, text, grounding=False)
    return TaskInput(Task.GROUNDED_VQA, text)


def read_conversation(messages: list[ChatMessage], max_chars: int) -> tuple[str, str, str]:
    """The conversation's one image URL, its location (`param`), and the last user message's text.

    Only the last message, which must be the user's, is asked: Kosmos-2 has no system prompt and no
    chat format, so system and earlier messages are not sent to it. The image may be in any message.
    """
    images = [
        (part.image_url.url, f"messages[{i}].content[{j}]")
        for i, message in enumerate(messages) if isinstance(message.content, list)
        for j, part in enumerate(message.content) if part.type == "image_url"
    ]
    if not images:
        raise ChatRequestError(
            "Kosmos-2 answers about an image: add one content part {\"type\": \"image_url\", \"image_url\": "
            "{\"url\": \"data:image/png;base64,...\"}} to the user's message.", "messages")
    if len(images) > 1:
        where = ", ".join(param for _, param in images)
        raise ChatRequestError(
            f"Kosmos-2 reads one image per request; the messages hold {len(images)} image_url parts ({where}). "
            "Send one image per request.", images[1][1])
    last = messages[-1]
    if last.role != "user":
        raise ChatRequestError(
            f"The last message must be the user's (it is {last.role!r}): Kosmos-2 answers the user's last message.",
            f"messages[{len(messages) - 1}].role")
    if isinstance(last.content, list):
        text = " ".join(part.text.strip() for part in last.content if part.type == "text" and part.text.strip())
    else:
        text = last.content or ""
    if len(text) > max_chars:
        raise ChatRequestError(f"The user's message is {len(text)} characters long; the limit is {max_chars} "
                               "(KOSMOS_MAX_PROMPT_CHARS).", f"messages[{len(messages) - 1}].content")
    url, param = images[0]
    return url, f"{param}.image_url.url", text


def generation_params(body: ChatCompletionRequest, max_new_tokens_cap: int) -> list[GenerationParams]:
    """One GenerationParams per choice: greedy unless temperature > 0; sampled choice i uses seed + i."""
    max_tokens, field = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, field = body.max_tokens, "max_tokens"
    if max_tokens is not None and max_tokens > max_new_tokens_cap:
        raise ChatRequestError(f"{field} is {max_tokens}; this service allows at most {max_new_tokens_cap} new "
                               "tokens (KOSMOS_MAX_NEW_TOKENS_CAP).", field)
    if not body.sampling:
        if body.n > 1:
            raise ChatRequestError(
                f"n is {body.n}, but without a temperature above 0 decoding is greedy and every choice would be "
                "the same; send a temperature (e.g. 0.7) to sample several, or n: 1.", "n")
        return [GenerationParams(max_new_tokens=max_tokens)]
    return [
        GenerationParams(
            max_new_tokens=max_tokens, do_sample=True, temperature=body.temperature,
            top_p=body.top_p if body.top_p is not None else SAMPLING_TOP_P,
            seed=None if body.seed is None else body.seed + index,
        )
        for index in range(body.n)
    ]


# --- result -> chat answer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatAnswer:
    """What a choice says: markdown content, its grounded entities, and whether a stop string cut it."""

    content: str
    entities: tuple[Entity, ...]
    stopped: bool = False

    def entities_json(self) -> list[dict]:
        return [{"phrase": e.phrase, "boxes": [list(box) for box in e.boxes],
                 "pixel_boxes": [list(box) for box in e.pixel_boxes]} for e in self.entities]


def chat_answer(
    text: str, answer: str, entities: tuple[Entity, ...], *, question: bool, stop: tuple[str, ...] = (),
    partial: bool = False,
) -> ChatAnswer:
    """The chat answer for a generation's clean `text` (prompt words included) and its `answer` (without them).

    A question's answer leaves out the `Question: ... Answer:` frame; other prompts keep their words, as
    `/predict` does. Stop strings are looked for in the generated words only, and the answer ends before
    the first one found. `partial`: the generation is still growing, so hold back whatever later words
    could change (a stop string that may be starting, a phrase the limit would split).

    >>> snowman = Entity("a snowman", (12, 21), ((0.39, 0.04, 0.98, 0.82),), ((250, 22, 630, 397),))
    >>> chat_answer("An image of a snowman.", "a snowman.", (snowman,), question=False).content
    'An image of [a snowman](#box=250,22,630,397).'
    >>> chat_answer("An image of a snowman.", "a snowman.", (snowman,), question=False, stop=(".",)).content
    'An image of [a snowman](#box=250,22,630,397)'
    >>> vqa = Entity("A snowman", (29, 38), ((0.39, 0.04, 0.98, 0.82),), ((250, 22, 630, 397),))
    >>> chat_answer("Question: Who is it? Answer: A snowman.", "A snowman.", (vqa,), question=True).content
    '[A snowman](#box=250,22,630,397).'
    """
    prompt_end = len(text) - len(answer)  # where the generated words begin (answer is a suffix of text)
    offset = prompt_end if question else 0
    shown = text[offset:]
    entities = tuple(dataclasses.replace(e, span=(e.span[0] - offset, e.span[1] - offset))
                     for e in entities if e.span[0] >= offset)
    search_from = prompt_end - offset
    found = [at for at in (shown.find(s, search_from) for s in stop) if at >= 0]
    limit = min(found, default=len(shown))
    if partial and stop:  # a stop string may be starting in the last few characters
        limit = min(limit, max(search_from, len(shown) - max(map(len, stop)) + 1))
    if partial:  # never show part of a phrase as plain text that a later token turns into a link
        for entity in entities:
            if entity.span[0] < limit < entity.span[1]:
                limit = entity.span[0]
    kept = tuple(e for e in entities if e.span[1] <= limit)
    return ChatAnswer(render_markdown(shown[:limit], kept), kept, stopped=bool(found))


def settled_prefix(raw: str) -> str:
    """The start of a growing raw generation that later tokens cannot change: up to a phrase or object still open.

    >>> settled_prefix("<grounding> An image of<phrase> a cat</phrase><object><patch_index_0001>")
    '<grounding> An image of'
    >>> settled_prefix("<phrase> a cat</phrase><object><patch_index_0001><patch_index_0002></object> on<")
    '<phrase> a cat</phrase><object><patch_index_0001><patch_index_0002></object> on'
    """
    closed = raw.rfind("</object>")
    after = closed + len("</object>") if closed >= 0 else 0
    cut = len(raw)
    for opener in ("<phrase>", "<object>"):
        at = raw.find(opener, after)
        if at >= 0:
            cut = min(cut, at)
    partial_tag = raw.rfind("<")
    if partial_tag >= 0 and ">" not in raw[partial_tag:]:
        cut = min(cut, partial_tag)
    return raw[:cut]
