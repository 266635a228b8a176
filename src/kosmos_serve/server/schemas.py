"""Request and response bodies of the JSON API, and their conversion to engine requests."""

from __future__ import annotations

import base64
import io
from typing import Annotated

from fastapi import UploadFile
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, Json

from kosmos_serve.drawing import draw_result
from kosmos_serve.engine import Result
from kosmos_serve.generation import (
    GenerationParams,
    MaxNewTokens,
    NoRepeatNgramSize,
    NumBeams,
    Seed,
    Temperature,
    TopP,
)
from kosmos_serve.server.common import (
    MIN_SCORE_DESCRIPTION,
    NMS_IOU_DESCRIPTION,
    SCORE_MEANING,
    SCORES_DESCRIPTION,
    MinScoreField,
    NmsIouField,
)
from kosmos_serve.tasks import Task, TaskInput

PixelCoordinate = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PixelBoxInput = tuple[PixelCoordinate, PixelCoordinate, PixelCoordinate, PixelCoordinate]


class GenerationFields(BaseModel):
    """Everything about a generation request except the image and its boxes.

    Numeric fields carry the engine's own ranges (`kosmos_serve.generation`), so the schema states what is valid.
    """

    model_config = ConfigDict(extra="forbid")

    task: Task = Field(Task.CAPTION, description="What to do; see GET /v1/tasks.")
    prompt: str | None = Field(None, description="Question (grounded_vqa, region_vqa, question) or own prompt (raw).")
    phrases: list[str] = Field([], description="Phrases to ground (phrase_grounding, referring_comprehension, "
                                               "detection) or the phrases of a region_vqa question.")
    grounding: bool = Field(True, description="raw task only: add `<grounding>` to the prompt.")
    max_new_tokens: MaxNewTokens | None = Field(
        None, description="New tokens at most (unset: the model's default; the cap is in GET /info)."
    )
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: Temperature = 0.7
    top_p: TopP = 0.9
    num_beams: NumBeams = 1
    seed: Seed | None = None
    no_repeat_ngram_size: NoRepeatNgramSize | None = Field(
        None, description="Forbid repeating n-grams of this size (0: off; unset: the model's default, else the "
                          "original demo's 3)."
    )
    min_score: MinScoreField | None = Field(None, description=MIN_SCORE_DESCRIPTION)
    nms_iou: NmsIouField | None = Field(None, description=NMS_IOU_DESCRIPTION)
    masks: bool = Field(False, description="Also a mask for every box (COCO run-length encoding in the image's pixels) "
                                           "and its score, from the service's segmenter (started with --segmenter; "
                                           "GET /info `segmenter`); without one, 422.")
    return_image: bool = Field(False, description="Also return the image with the boxes drawn (base64 PNG).")
    stream: bool = Field(False, description="Answer as server-sent events: `text` pieces, then the `result`.")

    def params(self) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, temperature=self.temperature,
            top_p=self.top_p, num_beams=self.num_beams, seed=self.seed, no_repeat_ngram_size=self.no_repeat_ngram_size,
            min_score=self.min_score, nms_iou=self.nms_iou, masks=self.masks,
        )

    def task_input(self, boxes: list[PixelBoxInput]) -> TaskInput:
        return TaskInput(self.task, self.prompt, tuple(self.phrases), tuple(tuple(b) for b in boxes), self.grounding)


class GenerateJSON(GenerationFields):
    """A request with the image as base64 (a `data:` URI is fine too); a URL only from an allowed host."""

    image: str = Field(description="The image file's bytes, base64-encoded (or a data: URI; an http(s) URL only "
                                   "from a host in KOSMOS_ALLOWED_IMAGE_HOSTS).")
    boxes: list[PixelBoxInput] = Field([], description="Boxes in the image's pixels, [x1, y1, x2, y2] each.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"image": "iVBORw0KGgo...", "task": "caption"},
            {"image": "iVBORw0KGgo...", "task": "referring_comprehension", "phrases": ["the red circle"]},
            {"image": "iVBORw0KGgo...", "task": "referring_generation", "boxes": [[20, 30, 120, 140]]},
            {"image": "iVBORw0KGgo...", "task": "grounded_vqa", "prompt": "What shape is red?", "return_image": True},
        ]},
    )


class GenerateForm(GenerationFields):
    """The multipart form: the `image` file and the other fields as text (`boxes` as JSON)."""

    image: UploadFile = Field(description="The image file.")

    boxes: Json[list[PixelBoxInput]] = Field(default_factory=list,
                                             description='Boxes in pixels as JSON: "[[x1, y1, x2, y2]]".')


class MaskOut(BaseModel):
    size: tuple[int, int] = Field(description="The image's height and width, as COCO's `size`.")
    counts: str = Field(description="COCO compressed run-length encoding (pycocotools' `mask.encode`), as text.")


class EntityOut(BaseModel):
    phrase: str
    span: tuple[int, int] = Field(description="Character range of the phrase in `text`.")
    boxes: list[tuple[float, float, float, float]] = Field(description="Normalised to 0..1.")
    pixel_boxes: list[tuple[int, int, int, int]] = Field(description="In the image's own pixels.")
    scores: list[float] = Field(description=SCORES_DESCRIPTION)
    masks: list[MaskOut] | None = Field(None, description="With `masks: true`: one mask per box, in the order of "
                                                          "`boxes`, in the pixels of the image as a viewer sees it.")
    mask_scores: list[float] | None = Field(None, description="With `masks: true`: the segmenter's predicted IoU of "
                                                              "each mask (its own quality score).")


class LineOut(BaseModel):
    text: str = Field(description="The line's text.")
    corners: list[tuple[int, int]] = Field(description="Its box's four corners, clockwise from the top left, in the "
                                                       "image's own pixels (as Kosmos-2.5's model doc lists them).")
    box: tuple[int, int, int, int] = Field(description="Its box, x1, y1, x2, y2 in the image's own pixels.")


class GenerateResponse(BaseModel):
    task: Task
    prompt: str
    text: str = Field(description="Clean text, prompt words included (as post_process_generation gives it).")
    answer: str = Field(description="The generated words without the prompt's.")
    raw_text: str = Field(description="Generated text with its grounding tags.")
    entities: list[EntityOut]
    markdown: str = Field(description="`text` with each grounded span as [span](#box=x1,y1,x2,y2); task ocr: each line "
                                      "so; task markdown: the page as the model wrote it.")
    lines: list[LineOut] | None = Field(None, description="Task ocr (Kosmos-2.5): every line read, with its box.")
    image_size: tuple[int, int]
    generated_tokens: int
    image_cached: bool = Field(description="The image's features came from the cache (vision encoder skipped).")
    timings: dict[str, float]
    annotated_image: str | None = Field(None, description="PNG, base64, when `return_image` was asked for.")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "task": "caption", "prompt": "<grounding> An image of",
        "text": "An image of a snowman warming himself by a fire.",
        "answer": "a snowman warming himself by a fire.",
        "raw_text": "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863>"
                    "</object> warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911>"
                    "</object>.",
        "entities": [
            {"phrase": "a snowman", "span": [12, 21], "boxes": [[0.390625, 0.046875, 0.984375, 0.828125]],
             "pixel_boxes": [[250, 22, 630, 397]], "scores": [0.87]},
            {"phrase": "a fire", "span": [41, 47], "boxes": [[0.171875, 0.015625, 0.484375, 0.890625]],
             "pixel_boxes": [[110, 7, 310, 427]], "scores": [0.64]},
        ],
        "markdown": "An image of [a snowman](#box=250,22,630,397) warming himself by [a fire](#box=110,7,310,427).",
        "image_size": [640, 480], "generated_tokens": 25, "image_cached": False,
        "timings": {"vision_seconds": 1.2, "generation_seconds": 3.1}, "annotated_image": None,
    }]})


class PredictResponse(BaseModel):
    """The reference service's answer, unchanged, plus `scores` beside `entities` (which keep the reference's shape)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "output": "An image of a snowman warming himself by a fire.",
        "generated_text": "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044>"
                          "<patch_index_0863></object> warming himself by<phrase> a fire</phrase><object>"
                          "<patch_index_0005><patch_index_0911></object>.",
        "entities": [["a snowman", [12, 21], [[0.390625, 0.046875, 0.984375, 0.828125]]],
                     ["a fire", [41, 47], [[0.171875, 0.015625, 0.484375, 0.890625]]]],
        "scores": [[0.87], [0.64]],
    }]})

    output: str = Field(description="Clean text.")
    generated_text: str = Field(description="Raw generated text after `</image>`, tags included.")
    entities: list[tuple[str, tuple[int, int], list[tuple[float, float, float, float]]]] = Field(
        description="(phrase, (start, end), [normalised boxes]) as post_process_generation gives them."
    )
    scores: list[list[float]] = Field(
        description=f"Not in the reference: one list per entity, in the order of `entities`, one score per box, in "
                    f"the order of its boxes: {SCORE_MEANING}."
    )


def response_body(result: Result, image: Image.Image | None) -> dict:
    """The JSON answer: the result, plus the annotated image when one is given."""
    body = result.to_dict()
    if image is not None:
        buffer = io.BytesIO()
        draw_result(image, result).save(buffer, format="PNG")
        body["annotated_image"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return body


def predict_body(result: Result) -> dict:
    """The reference service's `{output, generated_text, entities}`, and each entity's box `scores` beside them.

    The entities keep the reference's shape, `[phrase, [start, end], [boxes]]`, so that clients unpacking three
    items go on working; the scores sit in a list of their own, one per entity.
    """
    return {
        "output": result.text,
        "generated_text": result.raw_text,
        "entities": [entity.as_reference() for entity in result.entities],
        "scores": [list(entity.scores) for entity in result.entities],
    }
