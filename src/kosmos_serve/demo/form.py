"""What the demo page asks for: the inputs each task shows, and the typed values turned into a request.

Gradio-free, so it is tested without a browser. Boxes are typed one per line as `x1,y1,x2,y2` in
pixels of the image as shown, or picked by clicking two opposite corners on the image.
"""

from __future__ import annotations

from dataclasses import dataclass

from kosmos_serve.engine import GenerationParams
from kosmos_serve.tasks import Task, TaskInput, parse_box, parse_task

Box = tuple[float, float, float, float]
Corner = tuple[int, int]


@dataclass(frozen=True)
class TextField:
    """A text input a task shows: its label and an example for the placeholder."""

    label: str
    example: str


@dataclass(frozen=True)
class TaskFields:
    """What a task shows: a one-line hint, the prompt and phrase inputs it reads, and whether it takes boxes."""

    hint: str
    prompt: TextField | None = None
    phrases: TextField | None = None
    boxes: bool = False
    grounding: bool = False


BOX_EXAMPLE = "60,150,260,350"
TASK_FIELDS: dict[Task, TaskFields] = {
    Task.CAPTION: TaskFields("A brief caption; each phrase the model grounds gets its boxes."),
    Task.DETAILED_CAPTION: TaskFields("A detailed caption; each phrase the model grounds gets its boxes."),
    Task.PHRASE_GROUNDING: TaskFields("Finds the boxes of one phrase.", phrases=TextField("Phrase", "a red circle")),
    Task.REFERRING_COMPREHENSION: TaskFields(
        "Finds the object that an expression describes.",
        phrases=TextField("Referring expression", "the shape left of the square"),
    ),
    Task.REFERRING_GENERATION: TaskFields("Describes what the box(es) show.", boxes=True),
    Task.GROUNDED_VQA: TaskFields(
        "Answers a question with grounded words.", prompt=TextField("Question", "What is next to the circle?")
    ),
    Task.REGION_VQA: TaskFields(
        "Answers a question whose phrases point at boxes: one phrase per line and one box per phrase, in order.",
        prompt=TextField("Question", "What is the shape next to?"),
        phrases=TextField("Phrases of the question (one per line)", "the shape"), boxes=True,
    ),
    Task.DETECTION: TaskFields(
        "Finds the boxes of each phrase, run as one batch.",
        phrases=TextField("Phrases to find (one per line)", "a circle\na square"),
    ),
    Task.RAW: TaskFields(
        "Your own prompt; `<grounding>` goes first while grounding is on; one box per `<phrase>…</phrase>`.",
        prompt=TextField("Prompt", "<phrase> It</phrase> is"), boxes=True, grounding=True,
    ),
    Task.OCR: TaskFields("Kosmos-2.5 models: reads every line of text, each with its box."),
    Task.MARKDOWN: TaskFields("Kosmos-2.5 models: reads the page as markdown."),
    Task.QUESTION: TaskFields("Kosmos-2.5-chat: answers a question about the page.",
                              prompt=TextField("Question", "What is the total?")),
}


def task_input(task: str, prompt: str, phrases: str, boxes: str, grounding: bool) -> TaskInput:
    """The request for `task` from the form, reading only the fields that task shows (hidden ones may be stale)."""
    fields = TASK_FIELDS[parse_task(task)]
    return TaskInput(
        task=task,
        prompt=prompt if fields.prompt else None,
        phrases=parse_lines(phrases) if fields.phrases else (),
        boxes=parse_boxes(boxes) if fields.boxes else (),
        grounding=grounding if fields.grounding else True,
    )


def generation_params(sample: bool, top_p: float, temperature: float, max_new_tokens: float | None,
                      masks: bool = False) -> GenerationParams:
    """Decoding settings from the form (and whether to mask each box); an empty token count means the service's
    default."""
    return GenerationParams(
        max_new_tokens=None if max_new_tokens is None else int(max_new_tokens),
        do_sample=sample, top_p=top_p, temperature=temperature, masks=bool(masks),
    )


def parse_lines(text: str) -> tuple[str, ...]:
    """The non-blank lines of `text`, stripped.

    >>> parse_lines(" a red circle \\n\\n a square")
    ('a red circle', 'a square')
    """
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def parse_boxes(text: str) -> tuple[Box, ...]:
    """One `x1,y1,x2,y2` box per non-blank line (brackets allowed); an InvalidBoxError names a bad line.

    >>> parse_boxes("60,150,260,350\\n[0, 0, 10.5, 20]")
    ((60.0, 150.0, 260.0, 350.0), (0.0, 0.0, 10.5, 20.0))
    """
    return tuple(parse_box(line.strip("[]() ")) for line in parse_lines(text))


def add_corner(boxes: str, pending: Corner | None, clicked: Corner) -> tuple[str, Corner | None]:
    """A click on the image: the first corner waits; the second completes a box, appended as a line.

    >>> add_corner("", None, (260, 350))
    ('', (260, 350))
    >>> add_corner("", (260, 350), (60, 150))
    ('60,150,260,350', None)
    """
    if pending is None:
        return boxes, clicked
    (xa, ya), (xb, yb) = pending, clicked
    line = f"{min(xa, xb)},{min(ya, yb)},{max(xa, xb)},{max(ya, yb)}"
    return "\n".join([*parse_lines(boxes), line]), None
