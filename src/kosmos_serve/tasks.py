"""Task name + inputs -> prompt text and the boxes the processor turns into location tokens.

Every prompt is the model card's. Boxes arrive as pixels of the image as a person sees it,
are validated here, normalised, and handed to `Kosmos2Processor(bboxes=...)`, whose own
conversion (`coordinate_to_patch_index`) writes the `<object><patch_index_...>` tokens.

| task                      | inputs                          | prompt                                                      |
| ------------------------- | ------------------------------- | ----------------------------------------------------------- |
| caption                   | -                               | `<grounding> An image of`                                   |
| detailed_caption          | -                               | `<grounding> Describe this image in detail:`                |
| phrase_grounding          | one phrase                      | `<grounding><phrase> {phrase}</phrase>`                     |
| referring_comprehension   | one expression (as phrase)      | `<grounding><phrase> {expression}</phrase>`                 |
| referring_generation      | one or more boxes               | `<grounding><phrase> It</phrase><object>{boxes}</object> is`|
| grounded_vqa              | question (prompt)               | `<grounding> Question: {question} Answer:`                  |
| region_vqa                | question, phrases in it, boxes  | `<grounding> Question: ...<phrase> {p}</phrase><object>...` |
| detection                 | phrases                         | one `<grounding><phrase> {phrase}</phrase>` per phrase      |
| raw                       | prompt, optional boxes          | the prompt, `<grounding>` prepended when grounding is on    |

Kosmos-2.5 reads documents with two prompts of its own: `ocr` (`<ocr>`: every text line with its box)
and `markdown` (`<md>`: the page as markdown); Kosmos-2.5-chat also answers a `question` about the page, in the chat
prompt of transformers' model doc (`ocr.CHAT_TEMPLATE`). Which tasks a model runs is its family's
(`engine/families.py`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum

from kosmos_serve.errors import InvalidBoxError, InvalidRequestError
from kosmos_serve.grounding import NormalisedBox, to_normalised_box
from kosmos_serve.ocr import CHAT_TEMPLATE, MARKDOWN_TAG, OCR_TAG

GROUNDING_TAG = "<grounding>"
PHRASE_PATTERN = re.compile(r"<phrase>.+?</phrase>")


class Task(StrEnum):
    """The tasks of the Kosmos-2 model card, then Kosmos-2.5's."""

    CAPTION = "caption"
    DETAILED_CAPTION = "detailed_caption"
    PHRASE_GROUNDING = "phrase_grounding"
    REFERRING_COMPREHENSION = "referring_comprehension"
    REFERRING_GENERATION = "referring_generation"
    GROUNDED_VQA = "grounded_vqa"
    REGION_VQA = "region_vqa"
    DETECTION = "detection"
    RAW = "raw"
    OCR = "ocr"
    MARKDOWN = "markdown"
    QUESTION = "question"


# What each task does, in no surface's words: the CLI adds its flags, /v1/tasks the JSON fields (TASK_INPUTS).
TASK_DESCRIPTIONS = {
    Task.CAPTION: "brief grounded caption",
    Task.DETAILED_CAPTION: "detailed grounded caption",
    Task.PHRASE_GROUNDING: "find the box of one phrase",
    Task.REFERRING_COMPREHENSION: "find the box of a referring expression",
    Task.REFERRING_GENERATION: "describe what the given box(es) show",
    Task.GROUNDED_VQA: "answer a question with grounded words",
    Task.REGION_VQA: "answer a question whose phrases point at boxes, one box per phrase",
    Task.DETECTION: "boxes for each of several phrases, run as one batch",
    Task.RAW: "your own prompt, <grounding> added unless grounding is off; a box per <phrase>",
    Task.OCR: "Kosmos-2.5: read every line of text, each with its box",
    Task.MARKDOWN: "Kosmos-2.5: read the page as markdown",
    Task.QUESTION: "Kosmos-2.5-chat: answer a question about the page",
}


# The inputs each task reads; any other input given to it is refused, never ignored.
TASK_INPUTS: dict[Task, tuple[str, ...]] = {
    Task.CAPTION: (),
    Task.DETAILED_CAPTION: (),
    Task.PHRASE_GROUNDING: ("phrases",),
    Task.REFERRING_COMPREHENSION: ("phrases",),
    Task.REFERRING_GENERATION: ("boxes",),
    Task.GROUNDED_VQA: ("prompt",),
    Task.REGION_VQA: ("prompt", "phrases", "boxes"),
    Task.DETECTION: ("phrases",),
    Task.RAW: ("prompt", "boxes", "grounding"),
    Task.OCR: (),
    Task.MARKDOWN: (),
    Task.QUESTION: ("prompt",),
}


@dataclass(frozen=True)
class TaskInput:
    """What a caller asks for: a task and the inputs it needs (boxes in image pixels)."""

    task: Task | str = Task.CAPTION
    prompt: str | None = None
    phrases: tuple[str, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    grounding: bool = True

    def given_inputs(self) -> list[str]:
        """The inputs set here, by the names of TASK_INPUTS (`grounding` counts when it is turned off).

        >>> TaskInput("raw", prompt="Hi", grounding=False).given_inputs()
        ['prompt', 'grounding']
        """
        given = {"prompt": bool(self.prompt), "phrases": bool(self.phrases), "boxes": bool(self.boxes),
                 "grounding": not self.grounding}
        return [name for name, is_given in given.items() if is_given]


def unused_inputs(request: TaskInput) -> list[str]:
    """The inputs `request` gives that its task does not read.

    >>> unused_inputs(TaskInput("caption", prompt="<grounding> Describe this image:"))
    ['prompt']
    """
    return [name for name in request.given_inputs() if name not in TASK_INPUTS[parse_task(request.task)]]


@dataclass(frozen=True)
class PromptSpec:
    """One model input: prompt text and, per `<phrase>` in it, its normalised boxes (or None)."""

    text: str
    bboxes: tuple[list[NormalisedBox] | None, ...] | None = None
    phrase: str | None = None  # set for detection rows: the phrase this row grounds


def parse_task(name: str | Task) -> Task:
    """The Task called `name`, or an error listing the valid names."""
    try:
        return Task(name)
    except ValueError:
        valid = ", ".join(task.value for task in Task)
        raise InvalidRequestError(f"Unknown task {name!r}; choose one of: {valid}.", field="task") from None


def validate_box(box: tuple[float, ...], width: int, height: int) -> NormalisedBox:
    """Check a pixel box (x1, y1, x2, y2) against a `width` x `height` image; return it normalised.

    >>> validate_box((160, 120, 480, 360), 640, 480)
    (0.25, 0.25, 0.75, 0.75)
    """
    if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        raise InvalidBoxError(f"A box is four finite numbers x1,y1,x2,y2 in pixels; got {box!r}.", field="boxes")
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise InvalidBoxError(f"Box {list(box)} is inverted or empty: it needs x2 > x1 and y2 > y1.", field="boxes")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise InvalidBoxError(f"Box {list(box)} lies outside the {width}x{height} image.", field="boxes")
    return to_normalised_box(box, width, height)


def build_prompts(request: TaskInput, width: int, height: int) -> list[PromptSpec]:
    """The model inputs for one request on a `width` x `height` image (several only for detection)."""
    task = parse_task(request.task)
    unused = unused_inputs(request)
    if unused:
        takes = ", ".join(TASK_INPUTS[task]) or "no inputs"
        own_prompt = "; to send a prompt of your own, use task 'raw'" if "prompt" in unused else ""
        raise InvalidRequestError(f"Task {task.value!r} does not use {' or '.join(unused)} (it takes {takes}){own_prompt}.")
    phrases = tuple(_check_phrase(p) for p in request.phrases)
    boxes = [validate_box(tuple(b), width, height) for b in request.boxes]
    builder = _BUILDERS[task]
    return builder(request, phrases, boxes)


def _check_phrase(phrase: str) -> str:
    phrase = phrase.strip()
    if not phrase:
        raise InvalidRequestError("A phrase is empty; give the words to ground.", field="phrases")
    if "<" in phrase or ">" in phrase:
        raise InvalidRequestError(f"Phrase {phrase!r} contains '<' or '>', which Kosmos-2 reserves for its tags.",
                                  field="phrases")
    return phrase


def _require(condition: bool, message: str, field: str) -> None:
    if not condition:
        raise InvalidRequestError(message, field)


def _fixed_prompt(text: str):
    def build(request: TaskInput, phrases, boxes) -> list[PromptSpec]:
        return [PromptSpec(text)]

    return build


def _single_phrase(request: TaskInput, phrases, boxes) -> list[PromptSpec]:
    task = parse_task(request.task)
    _require(len(phrases) == 1, f"Task {task.value!r} needs exactly one phrase; got {len(phrases)}.", "phrases")
    return [PromptSpec(f"{GROUNDING_TAG}<phrase> {phrases[0]}</phrase>")]


def _referring_generation(request: TaskInput, phrases, boxes) -> list[PromptSpec]:
    _require(bool(boxes), "Task 'referring_generation' needs at least one box, x1,y1,x2,y2 in pixels.", "boxes")
    return [PromptSpec(f"{GROUNDING_TAG}<phrase> It</phrase> is", bboxes=(boxes,))]


def _question(request: TaskInput) -> str:
    question = (request.prompt or "").strip()
    _require(bool(question), f"Task {parse_task(request.task).value!r} needs a question.", "prompt")
    return question


def _grounded_vqa(request: TaskInput, phrases, boxes) -> list[PromptSpec]:
    return [PromptSpec(f"{GROUNDING_TAG} Question: {_question(request)} Answer:")]


def _region_vqa(request: TaskInput, phrases, boxes) -> list[PromptSpec]:
    text = f"{GROUNDING_TAG} Question: {_question(request)} Answer:"
    _require(bool(phrases), "Task 'region_vqa' needs the phrases of the question that point at boxes.", "phrases")
    _require(
        len(phrases) == len(boxes),
        f"Task 'region_vqa' needs one box per phrase; got {len(phrases)} phrases and {len(boxes)} boxes.", "boxes",
    )
    for phrase in phrases:
        words = f" {phrase}"
        _require(words in text, f"Phrase {phrase!r} does not occur in the question.", "phrases")
        text = text.replace(words, f"<phrase>{words}</phrase>", 1)
    return [PromptSpec(text, bboxes=tuple([box] for box in boxes))]


def _detection(request: TaskInput, phrases, boxes) -> list[PromptSpec]:
    _require(bool(phrases), "Task 'detection' needs at least one phrase to look for.", "phrases")
    return [PromptSpec(f"{GROUNDING_TAG}<phrase> {p}</phrase>", phrase=p) for p in phrases]


def _chat_question(request: TaskInput, phrases, boxes) -> list[PromptSpec]:
    return [PromptSpec(CHAT_TEMPLATE.format(_question(request)))]


def _raw(request: TaskInput, phrases, boxes) -> list[PromptSpec]:
    prompt = request.prompt or ""
    _require(bool(prompt.strip()), "Task 'raw' needs a prompt.", "prompt")
    if request.grounding and not prompt.startswith(GROUNDING_TAG):
        prompt = f"{GROUNDING_TAG} {prompt.lstrip()}"
    if not boxes:
        return [PromptSpec(prompt)]
    slots = len(PHRASE_PATTERN.findall(prompt))
    _require(
        slots == len(boxes),
        f"The prompt has {slots} <phrase>...</phrase> pairs but {len(boxes)} boxes were given; give one per phrase.",
        "boxes",
    )
    return [PromptSpec(prompt, bboxes=tuple([box] for box in boxes))]


_BUILDERS = {
    Task.CAPTION: _fixed_prompt(f"{GROUNDING_TAG} An image of"),
    Task.DETAILED_CAPTION: _fixed_prompt(f"{GROUNDING_TAG} Describe this image in detail:"),
    Task.PHRASE_GROUNDING: _single_phrase,
    Task.REFERRING_COMPREHENSION: _single_phrase,
    Task.REFERRING_GENERATION: _referring_generation,
    Task.GROUNDED_VQA: _grounded_vqa,
    Task.REGION_VQA: _region_vqa,
    Task.DETECTION: _detection,
    Task.RAW: _raw,
    Task.OCR: _fixed_prompt(OCR_TAG),
    Task.MARKDOWN: _fixed_prompt(MARKDOWN_TAG),
    Task.QUESTION: _chat_question,
}


def parse_box(value: str) -> tuple[float, float, float, float]:
    """`x1,y1,x2,y2` in pixels -> a tuple of four numbers.

    >>> parse_box("10,20,110.5,220")
    (10.0, 20.0, 110.5, 220.0)
    """
    parts = value.replace(" ", "").split(",")
    try:
        numbers = tuple(float(part) for part in parts)
    except ValueError:
        numbers = ()
    if len(numbers) != 4:
        raise InvalidBoxError(f"{value!r} is not a box; write x1,y1,x2,y2 in pixels, e.g. 10,20,200,180.",
                              field="boxes")
    return numbers
