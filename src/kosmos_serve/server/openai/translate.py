"""A chat request translated for Kosmos-2 (the conversation as a task, its fields as generation parameters), and
its results translated back (a chat answer, the completion's bodies and stream chunks).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import PreparedRequest, Result
from kosmos_serve.engine.results import line_dict
from kosmos_serve.errors import InvalidRequestError, KosmosServeError
from kosmos_serve.generation import GenerationParams
from kosmos_serve.grounding import Entity, parse_generation, render_markdown
from kosmos_serve.ocr import MARKDOWN_TAG, OCR_TAG
from kosmos_serve.server.openai.protocol import ChatCompletionRequest, ChatMessage, ChatRequestError
from kosmos_serve.tasks import Task, TaskInput, parse_task

PAGE_TASKS = (Task.OCR, Task.MARKDOWN, Task.QUESTION)  # Kosmos-2.5's
SAMPLING_TOP_P = 1.0  # OpenAI's and vLLM's default when a request samples without a top_p
KOSMOS_TAG = re.compile(r"</?(?:grounding|phrase|object)>|<patch_index_\d+>|</delimiter_of_multi_objects/>")
READ_REQUEST = re.compile(r"(?:please\s+)?(?:read|ocr|transcribe)\b", re.IGNORECASE)  # "read this": a page's lines


# --- conversation -> Kosmos-2 task --------------------------------------------------------------------------


def task_for_text(text: str, tasks: tuple[Task, ...] = (Task.CAPTION,)) -> TaskInput:
    """The task for the user's words on a model that runs `tasks`.

    Kosmos-2: none -> caption, Kosmos-2 tags -> as it is, else a grounded question. Kosmos-2.5: none, a request to
    read (`read this`, `OCR`, `transcribe ...`) or `<ocr>` -> ocr, `<md>` -> markdown, else a question (which only
    Kosmos-2.5-chat answers; the engine refuses it on another model, naming its tasks).

    >>> task_for_text("  ").task, task_for_text("What is red?").prompt
    (<Task.CAPTION: 'caption'>, 'What is red?')
    >>> tagged = task_for_text("<grounding><phrase> the red circle</phrase>")
    >>> tagged.task, tagged.prompt, tagged.grounding
    (<Task.RAW: 'raw'>, '<grounding><phrase> the red circle</phrase>', False)
    >>> reading = (Task.OCR, Task.MARKDOWN, Task.QUESTION)
    >>> [task_for_text(words, reading).task.value for words in ("", "Read this, please.", "<md>", "What is the total?")]
    ['ocr', 'ocr', 'markdown', 'question']
    """
    text = text.strip()
    if Task.OCR in tasks:
        if not text or READ_REQUEST.match(text) or text == OCR_TAG:
            return TaskInput(Task.OCR)
        if text == MARKDOWN_TAG:
            return TaskInput(Task.MARKDOWN)
        return TaskInput(Task.QUESTION, text)
    if not text:
        return TaskInput(Task.CAPTION)
    if KOSMOS_TAG.search(text):
        return TaskInput(Task.RAW, text, grounding=False)
    return TaskInput(Task.GROUNDED_VQA, text)


def read_conversation(messages: list[ChatMessage]) -> tuple[str, str, str]:
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
    url, param = images[0]
    return url, f"{param}.image_url.url", text


def max_tokens_field(body: ChatCompletionRequest) -> tuple[str, int | None]:
    """The field that bounds the answer's tokens and its value: `max_completion_tokens`, else `max_tokens`."""
    if body.max_completion_tokens is not None:
        return "max_completion_tokens", body.max_completion_tokens
    return "max_tokens", body.max_tokens


def generation_params(body: ChatCompletionRequest) -> list[GenerationParams]:
    """One GenerationParams per choice: greedy unless temperature > 0; sampled choice i uses seed + i."""
    _, max_tokens = max_tokens_field(body)
    if not body.sampling:
        if body.n > 1:
            raise ChatRequestError(
                f"n is {body.n}, but without a temperature above 0 decoding is greedy and every choice would be "
                "the same; send a temperature (e.g. 0.7) to sample several, or n: 1.", "n")
        return [GenerationParams(max_new_tokens=max_tokens, min_score=body.min_score)]
    return [
        GenerationParams(
            max_new_tokens=max_tokens, do_sample=True, temperature=body.temperature,
            top_p=body.top_p if body.top_p is not None else SAMPLING_TOP_P,
            seed=None if body.seed is None else body.seed + index, min_score=body.min_score,
        )
        for index in range(body.n)
    ]



def refusal(error: InvalidRequestError, body: ChatCompletionRequest, text: str,
            settings: EngineSettings) -> KosmosServeError:
    """The engine's refusal of a choice, said in the chat request's own terms: the field the client sent."""
    if error.field == "max_new_tokens":
        field, value = max_tokens_field(body)
        return ChatRequestError(f"{field} is {value}; this service allows at most {settings.max_new_tokens_cap} new "
                                "tokens (KOSMOS_MAX_NEW_TOKENS_CAP).", field)
    if error.field == "prompt":
        return ChatRequestError(f"The user's message is {len(text)} characters long; the limit is "
                                f"{settings.max_prompt_chars} (KOSMOS_MAX_PROMPT_CHARS).",
                                f"messages[{len(body.messages) - 1}].content")
    return error

# --- result -> chat answer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatAnswer:
    """What a choice says: markdown content, its grounded entities, and whether a stop string cut it."""

    content: str
    entities: tuple[Entity, ...]
    stopped: bool = False

    def entities_json(self) -> list[dict]:
        return [{"phrase": e.phrase, "boxes": [list(box) for box in e.boxes],
                 "pixel_boxes": [list(box) for box in e.pixel_boxes], "scores": list(e.scores)} for e in self.entities]


def chat_answer(
    text: str, answer: str, entities: tuple[Entity, ...], *, question: bool, stop: tuple[str, ...] = (),
    partial: bool = False, unscored: bool = False,
) -> ChatAnswer:
    """The chat answer for a generation's clean `text` (prompt words included) and its `answer` (without them).

    A question's answer leaves out the `Question: ... Answer:` frame; other prompts keep their words, as
    `/predict` does. Stop strings are looked for in the generated words only, and the answer ends before
    the first one found. `partial`: the generation is still growing, so hold back whatever later words
    could change (a stop string that may be starting, a phrase the limit would split); `unscored` with it: the
    entities' scores are not known yet and a `min_score` may still drop their boxes, so nothing from the first
    grounded phrase on is settled.

    >>> snowman = Entity("a snowman", (12, 21), ((0.39, 0.04, 0.98, 0.82),), ((250, 22, 630, 397),))
    >>> chat_answer("An image of a snowman.", "a snowman.", (snowman,), question=False).content
    'An image of [a snowman](#box=250,22,630,397).'
    >>> chat_answer("An image of a snowman.", "a snowman.", (snowman,), question=False, stop=(".",)).content
    'An image of [a snowman](#box=250,22,630,397)'
    >>> chat_answer("An image of a snowman.", "a snowman.", (snowman,), question=False, partial=True,
    ...             unscored=True).content
    'An image of '
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
            if entity.span[0] < limit < entity.span[1] or (unscored and entity.span[0] < min(entity.span[1], limit)):
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


# --- a choice and the completion ----------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One generation of the request: its engine request, and how to read its result."""

    request: PreparedRequest
    question: bool
    stop: tuple[str, ...]

    @property
    def reads_a_page(self) -> bool:
        """A Kosmos-2.5 task: its answer is the page's text (or the chat model's), not grounded phrases."""
        return parse_task(self.request.request.task.task) in PAGE_TASKS

    @property
    def prompt(self) -> str:
        """The prompt text the model is sent."""
        return self.request.prompts[0].text

    @property
    def max_new_tokens(self) -> int:
        """With the model's default filled in: reaching it means finish_reason "length"."""
        return self.request.params.max_new_tokens

    def answer(self, result: Result) -> ChatAnswer:
        """The chat answer `result` gives."""
        return chat_answer(result.text, result.answer, result.entities, question=self.question, stop=self.stop)

    def finish_reason(self, result: Result, answer: ChatAnswer) -> str:
        """"length" when the token limit ended the answer, else "stop"."""
        return "length" if not answer.stopped and result.generated_tokens >= self.max_new_tokens else "stop"

    def partial_answer(self, decoded_prompt: str, generated: str) -> str | None:
        """The answer's content as far as the generation so far settles it (None: nothing can be shown yet).

        The pieces are decoded apart from the prompt, so when they begin with a word rather than a tag or a
        space, only the result tells whether a space joins that word to the prompt's last one; a question's
        answer leaves the prompt's words out, so there it does not matter. A page's reading (Kosmos-2.5) comes
        whole with its result, its lines with their boxes and scores.
        """
        if self.reads_a_page or (not self.question and generated and not (generated[0] == "<" or generated[0].isspace())):
            return None
        grounded = parse_generation(settled_prefix(decoded_prompt + generated), self.prompt,
                                    *self.request.request.image.size)
        return chat_answer(grounded.text, grounded.answer, grounded.entities, question=self.question,
                           stop=self.stop, partial=True, unscored=self.request.min_score is not None).content


def extra_fields(result: Result, answer: ChatAnswer) -> dict:
    """A message's fields beyond OpenAI's: `entities` (Kosmos-2's grounded phrases), and for `ocr` `lines`, each
    with its text, corners, box and score as `/v1/generate` gives them."""
    fields = {"entities": answer.entities_json()}
    if result.task is Task.OCR:
        fields["lines"] = [line_dict(line) for line in result.lines]
    return fields


@dataclass(frozen=True)
class Completion:
    """What every body of one completion shares."""

    id: str
    created: int
    model: str
    prompt_tokens: int

    def usage(self, completion_tokens: int) -> dict:
        """OpenAI's `usage` for this many tokens generated."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def response(self, choices: list[Choice], results: list[Result]) -> dict:
        """The `chat.completion` body of the choices' results."""
        body_choices = []
        for index, (choice, result) in enumerate(zip(choices, results)):
            answer = choice.answer(result)
            message = {"role": "assistant", "content": answer.content, **extra_fields(result, answer)}
            body_choices.append({"index": index, "message": message, "logprobs": None,
                                 "finish_reason": choice.finish_reason(result, answer)})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": body_choices, "usage": self.usage(sum(r.generated_tokens for r in results))}

    def chunk(self, choices: list[dict], usage: dict | None = None, include_usage: bool = False) -> bytes:
        """One `chat.completion.chunk` server-sent event."""
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}
        if include_usage:
            body["usage"] = usage  # OpenAI: null on every chunk but the last, which has no choices
        return f"data: {json.dumps(body)}\n\n".encode()
