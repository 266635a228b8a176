"""The ML backend's wire format: the bodies Label Studio sends, the predictions it reads, and the error body."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from kosmos_serve.engine import Result
from kosmos_serve.exports import label_studio as export
from kosmos_serve.exports.records import ReadLine
from kosmos_serve.server.errors import ErrorAnswer, ErrorFormat
from kosmos_serve.server.label_studio.config import MIN_SCORE_CONTROL, DetectionConfig, LabelSpec, ReadingConfig

PREFIX = "/label-studio"
MODEL_CLASS = "Kosmos2"  # what /health names, as the ML backend names its model class
TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")
# A region's score is its box's (the engine's: the model's confidence that the box shows the phrase, 0..1),
# so Label Studio's `model_score_threshold` and its score filters work on it; a task's score is the mean of
# its regions', 0 when no box is left, so lowest-score-first sampling brings the images the model is least
# sure of (or found nothing in) to an annotator first.
INTERNAL_ERROR_MESSAGE = "Internal error; the service log has the details."
prediction = export.prediction  # one task's prediction: one formula for the backend and the export


# ------------------------------------------------------------------------------------------------ errors


def is_label_studio_path(path: str) -> bool:
    """Whether `path` belongs to the Label Studio backend (its errors take the ML backend's shape)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def render_error(answer: ErrorAnswer, request: Request) -> JSONResponse:
    """The ML backend's error shape, `{"status", "detail"}`, plus the service's error code."""
    code = answer.code
    if code == "http_error" and answer.status == 400:  # FastAPI's 400 for a body it cannot parse (not UTF-8, say)
        code = "invalid_request"
    detail = INTERNAL_ERROR_MESSAGE if code == "internal_error" else answer.message
    return JSONResponse({"status": answer.status, "detail": detail, "code": code}, answer.status,
                        headers=answer.headers)


# The threshold by its <Number> control; phrases (the labels', or the annotator's text) go unnamed: errors quote them.
ERROR_FORMAT = ErrorFormat(owns=is_label_studio_path, render=render_error, names={"min_score": MIN_SCORE_CONTROL})


# ------------------------------------------------------------------------------------------------ wire format


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # Label Studio sends more than this backend reads


EXAMPLE_CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                  '<Label value="Circle" hint="the blue circle"/><Label value="Cross" hint="the yellow cross"/>'
                  '</RectangleLabels></View>')


class SetupBody(_Open):
    """`POST /setup` as Label Studio's ML API connector sends it."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"project": "1.1796147424", "schema": EXAMPLE_CONFIG, "hostname": "http://localhost:8080",
         "access_token": "<the project owner's token>", "extra_params": None}]})

    project: str | None = Field(None, description="`<project id>.<created-at timestamp>`")
    schema_: str = Field(alias="schema", description="The project's labeling config (XML).")
    extra_params: Any = None


class LabelStudioTask(_Open):
    """One task: its id and its data (`data.image` holds the image reference the labeling config names)."""

    id: int | None = None
    data: dict[str, Any]


class PredictParams(_Open):
    login: str | None = None
    password: str | None = None
    context: dict[str, Any] | None = Field(None, description="Interactive pre-annotation: `{result: [...]}`.")


class PredictBody(_Open):
    """`POST /predict` as Label Studio's ML API connector sends it."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/6d5a7a3b-scene-four-shapes.png"}, "annotations": [],
                    "predictions": [], "project": 1}],
         "project": "1.1796147424", "label_config": EXAMPLE_CONFIG,
         "params": {"login": None, "password": None, "context": None}}]})

    tasks: list[LabelStudioTask]
    label_config: str = Field(description="The project's labeling config (XML).")
    project: str | None = None
    model_version: str | None = None
    params: PredictParams | None = None


class WebhookBody(_Open):
    """`POST /webhook`: Label Studio's event, e.g. `ANNOTATION_CREATED` with the project and annotation."""

    action: str



# ------------------------------------------------------------------------------------------------ predictions


def regions(result: Result, config: DetectionConfig, plan: dict[str, LabelSpec | None]) -> list[dict]:
    """Each box of each grounded phrase as a region of the config's type, with the box's score: a `rectanglelabels`
    box in percent of the image, or the box's mask as `brushlabels` (Label Studio's run-length encoding) or
    `polygonlabels` (its largest part's outline, in percent); a box whose mask is empty is left out."""
    width, height = result.image_size
    found = []
    for entity in result.entities:
        if entity.phrase not in plan:
            continue
        label = plan[entity.phrase]
        labels = [label.value] if label else []
        masks = entity.masks if config.masks else [None] * len(entity.boxes)
        for (x1, y1, x2, y2), score, mask in zip(entity.boxes, entity.scores, masks, strict=True):
            if mask is None:
                x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
                value = {"x": 100 * x1, "y": 100 * y1, "width": 100 * (x2 - x1), "height": 100 * (y2 - y1),
                         "rotation": 0, "rectanglelabels": labels}
            elif (value := export.mask_value(mask, labels, config.region_type)) is None:
                continue
            region = {
                "id": uuid.uuid4().hex[:10],
                "from_name": config.from_name,
                "to_name": config.to_name,
                "type": config.region_type,
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "value": value,
                "score": score,
            }
            if label is None:  # a typed phrase no label fits: the region comes unlabelled, the phrase as its note
                region["meta"] = {"text": [entity.phrase]}
            found.append(region)
    return found


def line_regions(result: Result, config: ReadingConfig) -> list[dict]:
    """Each line of a page read as Label Studio's OCR template holds it, built as the export builds it: a
    `rectanglelabels` region with the config's line label, in percent of the image, and a `textarea` region of the
    same id in the config's per-region `<TextArea>` with the line's text, both with the line's score."""
    width, height = result.image_size
    found = []
    for line in result.lines:
        found += export.line_regions(ReadLine(line.text, line.box, line.corners, line.score), uuid.uuid4().hex[:10],
                                     config.from_name, config.to_name, width, height, config.line_label,
                                     config.transcription_from)
    return found
