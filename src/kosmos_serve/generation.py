"""Decoding parameters: their ranges (declared once, for the engine, the CLI and the API schema) and defaults.

Every range below is a pydantic constraint. The HTTP schemas annotate their fields with these same
types, so OpenAPI declares exactly what the engine accepts; the engine checks them again for callers
of the Python API and the CLI. A value that would make sampling fail (an infinite or vanishing
temperature, a seed torch cannot take) is outside its range.

Defaults come in layers, the first set one wins: the request's field, the operator's setting
(`KOSMOS_MAX_NEW_TOKENS`, `KOSMOS_NO_REPEAT_NGRAM_SIZE`, `KOSMOS_MIN_SCORE`, `DEFAULT_PROMPT`), the model folder's
`kosmos_serve.json`, and the built-in defaults (the original demo's).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from kosmos_serve.errors import InvalidInputsError, InvalidRequestError, ModelLoadError, describe_validation_errors

MAX_NEW_TOKENS_LIMIT = 2048  # Kosmos-2's context; the configured cap (KOSMOS_MAX_NEW_TOKENS_CAP) is at most this
MAX_BEAMS = 8
SEED_LIMIT = 2**53 - 1  # the largest integer every JSON client reads exactly (torch.manual_seed takes up to 2**64 - 1)

MaxNewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS_LIMIT, description="New tokens at most.")]
Temperature = Annotated[float, Field(ge=0.01, le=100.0, allow_inf_nan=False, description="Sampling temperature.")]
TopP = Annotated[float, Field(
    gt=0.0, le=1.0, allow_inf_nan=False,
    description="Nucleus sampling: keep the smallest set of tokens with this much probability.",
)]
NumBeams = Annotated[int, Field(ge=1, le=MAX_BEAMS, description="Beam search width (1: none).")]
NoRepeatNgramSize = Annotated[int, Field(
    ge=0, le=64, description="Forbid repeating n-grams of this size (the original demo's 3; 0: off).",
)]
Seed = Annotated[int, Field(ge=0, le=SEED_LIMIT, description="Seed of a sampled request, for repeatable samples.")]
MinScore = Annotated[float, Field(
    ge=0.0, le=1.0, allow_inf_nan=False,
    description="Drop boxes whose score is under this (0..1); an entity left with no box is dropped.",
)]
NmsIou = Annotated[float, Field(
    ge=0.0, le=1.0, allow_inf_nan=False,
    description="Of two boxes of different phrases overlapping by more than this IoU (0..1), drop the lower-scored "
                "(non-maximum suppression across phrases; 1: off).",
)]

MODEL_DEFAULTS_FILE = "kosmos_serve.json"
# Both measured together on the demo model's held-out scenes (BENCHMARKS.md, "Scores and the threshold"); 0.5 is
# also the usual IoU of class-agnostic NMS in detection pipelines.
DEFAULT_MIN_SCORE = 0.002
DEFAULT_NMS_IOU = 0.5
REFERENCE_DEFAULT_PROMPT = "<grounding> Describe this image:"  # the reference service's DEFAULT_PROMPT


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings of one request; None means the engine's default (operator, then model, then built-in)."""

    max_new_tokens: MaxNewTokens | None = None
    do_sample: bool = False
    temperature: Temperature = 0.7
    top_p: TopP = 0.9
    num_beams: NumBeams = 1
    no_repeat_ngram_size: NoRepeatNgramSize | None = None
    seed: Seed | None = None
    min_score: MinScore | None = None  # a filter on the result's boxes, not a decoding knob; None: the task's default
    nms_iou: NmsIou | None = None  # another filter on them: one region, one phrase; None: the task's default
    masks: bool = False  # a mask for every box from the engine's segmenter (`--segmenter`), not a decoding knob

    def validate(self, max_new_tokens_cap: int) -> None:
        """Raise InvalidRequestError for a parameter out of its range (InvalidInputsError for several), its field."""
        if isinstance(self.max_new_tokens, int) and not 1 <= self.max_new_tokens <= max_new_tokens_cap:
            raise InvalidRequestError(
                f"Must be between 1 and {max_new_tokens_cap} (the cap, KOSMOS_MAX_NEW_TOKENS_CAP).",
                field="max_new_tokens",
            )
        try:
            _PARAMS.validate_python(dataclasses.asdict(self))
        except ValidationError as error:
            problems = [InvalidRequestError(f"{problem['msg']}.", field=str(problem["loc"][0]))
                        for problem in error.errors()]
            raise problems[0] if len(problems) == 1 else InvalidInputsError(problems) from None


_PARAMS = TypeAdapter(GenerationParams)


class ModelDefaults(BaseModel):
    """kosmos-serve defaults a model folder may carry in `kosmos_serve.json`; settings and requests override them.

    >>> ModelDefaults.model_validate_json('{"default_prompt": "<grounding> An image of", "no_repeat_ngram_size": 0}')
    ModelDefaults(default_prompt='<grounding> An image of', max_new_tokens=None, no_repeat_ngram_size=0, min_score=None, nms_iou=None)
    """

    model_config = ConfigDict(extra="forbid")

    default_prompt: str | None = Field(None, min_length=1, description="Prompt of POST /predict when none is sent.")
    max_new_tokens: MaxNewTokens | None = None
    no_repeat_ngram_size: NoRepeatNgramSize | None = None
    min_score: MinScore | None = None
    nms_iou: NmsIou | None = None


BUILT_IN_DEFAULTS = ModelDefaults(default_prompt=REFERENCE_DEFAULT_PROMPT, max_new_tokens=128, no_repeat_ngram_size=3,
                                  min_score=DEFAULT_MIN_SCORE, nms_iou=DEFAULT_NMS_IOU)


def read_model_defaults(folder: str | Path) -> ModelDefaults:
    """The defaults in `folder`/kosmos_serve.json (none set when the file is absent); a bad file is a ModelLoadError."""
    path = Path(folder) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return ModelDefaults()
    try:
        return ModelDefaults.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, ValidationError) as error:
        problems = describe_validation_errors(error.errors()) if isinstance(error, ValidationError) else str(error)
        raise ModelLoadError(f"{path} is not a valid kosmos-serve defaults file: {problems}.") from None


def resolve_defaults(*layers: ModelDefaults) -> ModelDefaults:
    """Each field from the first layer that sets it, then the built-in default.

    >>> resolve_defaults(ModelDefaults(max_new_tokens=16), ModelDefaults(max_new_tokens=64, no_repeat_ngram_size=0))
    ModelDefaults(default_prompt='<grounding> Describe this image:', max_new_tokens=16, no_repeat_ngram_size=0, min_score=0.002, nms_iou=0.5)
    """
    resolved = {}
    for name in ModelDefaults.model_fields:
        values = [getattr(layer, name) for layer in (*layers, BUILT_IN_DEFAULTS)]
        resolved[name] = next(value for value in values if value is not None)
    return ModelDefaults(**resolved)


def generation_kwargs(params: GenerationParams) -> dict:
    """`generate` keyword arguments for `params` with its defaults filled in (sampling knobs only when sampling)."""
    kwargs = {
        "max_new_tokens": params.max_new_tokens,
        "num_beams": params.num_beams,
        "no_repeat_ngram_size": params.no_repeat_ngram_size,
        "do_sample": params.do_sample,
    }
    if params.do_sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p)
    return kwargs
