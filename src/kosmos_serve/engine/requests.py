"""What the engine is asked: a `Request`, validated once into a `PreparedRequest`, then tokenised into `Row`s."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from kosmos_serve.config import EngineSettings
from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.generation import GenerationParams
from kosmos_serve.grounding import GroundedText
from kosmos_serve.tasks import PromptSpec, TaskInput, build_prompts

# Token ids do not depend on pixels: tokenising against this placeholder runs the processor's own
# text path (tags, location tokens, image slots) without preprocessing the real image per prompt.
TOKENISATION_PLACEHOLDER = Image.new("RGB", (1, 1))
PROMPT_CACHE_SIZE = 1024  # prompts whose token counts PromptReader keeps


def tokenise(processor, text: str, bboxes=None) -> tuple[list[int], list[int]]:
    """Token ids and image-position mask of a prompt, exactly as the processor makes them with an image."""
    encoded = processor(text=text, images=TOKENISATION_PLACEHOLDER, bboxes=bboxes)
    return encoded["input_ids"], encoded["image_embeds_position_mask"]


@dataclass(frozen=True)
class Request:
    """One image, what to do with it, and how to decode."""

    image: Image.Image
    task: TaskInput = field(default_factory=TaskInput)
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass(frozen=True)
class PreparedRequest:
    """A request the engine has checked: its prompts, and its parameters with the model's defaults filled in."""

    request: Request
    prompts: tuple[PromptSpec, ...]
    params: GenerationParams
    min_score: float | None = None  # boxes scored under it are dropped (None: all kept)
    nms_iou: float | None = None  # a box overlapping a higher-scored one of another phrase by more is dropped


@dataclass
class Row:
    """One prompt to generate: its tokenised inputs, the image it reads, and once generated its output."""

    spec: PromptSpec
    image_key: str
    input_ids: list[int]
    image_mask: list[int]
    output: GroundedText | None = None
    generated_tokens: int = 0
    generation_seconds: float = 0.0


def check_task(task: TaskInput, params: GenerationParams, settings: EngineSettings,
               image_size: tuple[int, int]) -> list[PromptSpec]:
    """Validate a task and its parameters against the limits in `settings`; its prompts for an image of that size."""
    params.validate(settings.max_new_tokens_cap)
    limit = settings.max_prompt_chars
    for name, text in [("prompt", task.prompt or ""), *(("phrases", phrase) for phrase in task.phrases)]:
        if len(text) > limit:
            what = "The prompt" if name == "prompt" else "A phrase"
            raise InvalidRequestError(f"{what} is {len(text)} characters long; the limit is {limit} "
                                      "(KOSMOS_MAX_PROMPT_CHARS).", name)
    return build_prompts(task, *image_size)


class PromptReader:
    """Counts a prompt's tokens and decodes them back, on a private copy of the processor.

    The copy keeps these calls (made from the HTTP side) off the processor the engine thread is using;
    results are cached by prompt. `tokenise_prompt` is the model family's: (processor, prompt) -> (ids, image mask).
    """

    def __init__(self, processor, tokenise_prompt: Callable[[object, PromptSpec], tuple[list[int], list[int]]]):
        self._processor = copy.deepcopy(processor)
        self._tokenise = tokenise_prompt
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[int, str]] = {}

    def read(self, prompt: str) -> tuple[int, str]:
        """(tokens the model reads: <s>, <image>, the image positions, </image> and the text; the text decoded)."""
        with self._lock:
            if prompt not in self._cache:
                if len(self._cache) >= PROMPT_CACHE_SIZE:
                    self._cache.clear()
                ids, _ = self._tokenise(self._processor, PromptSpec(prompt))
                decoded = self._processor.batch_decode([ids], skip_special_tokens=True)[0]
                self._cache[prompt] = (len(ids), decoded.split("</image>")[-1])
            return self._cache[prompt]
