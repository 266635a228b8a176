"""The ML backend's routes under `/label-studio`: health, setup, predict and webhook."""

from __future__ import annotations

import asyncio
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kosmos_serve.engine import Request as EngineRequest
from kosmos_serve.errors import InvalidRequestError, KosmosServeError
from kosmos_serve.exports.label_studio import model_version
from kosmos_serve.generation import GenerationParams
from kosmos_serve.server.common import DisconnectWatch, decode_image, service_state
from kosmos_serve.server.errors import AnsweringRoute
from kosmos_serve.server.label_studio.config import (
    DetectionConfig,
    ReadingConfig,
    detection_plan,
    min_score,
    parse_labeling_config,
    parse_reading_config,
)
from kosmos_serve.server.label_studio.images import task_image_bytes
from kosmos_serve.server.label_studio.protocol import (
    MODEL_CLASS,
    PREFIX,
    TRAIN_EVENTS,
    LabelStudioTask,
    PredictBody,
    SetupBody,
    WebhookBody,
    line_regions,
    prediction,
    regions,
)
from kosmos_serve.server.state import ServiceState
from kosmos_serve.tasks import Task, TaskInput

router = APIRouter(prefix=PREFIX, tags=["label-studio"], route_class=AnsweringRoute)


def _model_version(state: ServiceState) -> str:
    return model_version(state.engine_settings.model, state.engine_settings.quantize)


def _labeling_config(state: ServiceState, xml: str) -> DetectionConfig | ReadingConfig:
    """The labeling config as the loaded model fills it: a Kosmos-2.5 reads pages into the OCR template's lines, a
    Kosmos-2 finds its labels' boxes (a 503 while the model loads: its family decides)."""
    state.ready_batcher()
    return parse_reading_config(xml) if Task.OCR in state.engine.family.tasks else parse_labeling_config(xml)


@router.get("/health", summary="Liveness as the ML backend reports it: `UP` once the model is ready (else 503).")
@router.get("/", include_in_schema=False)
async def health(request: Request):
    service_state(request).ready_batcher()
    return {"status": "UP", "model_class": MODEL_CLASS}


@router.post("/setup",
             summary="Label Studio connects a project: checks its labeling config, answers the model version.")
async def setup(request: Request, body: SetupBody):
    state = service_state(request)
    _labeling_config(state, body.schema_)
    return {"model_version": _model_version(state)}


@router.post("/predict", summary="Boxes (or their masks, for BrushLabels and PolygonLabels) for each task's image, one "
                                  "phrase per label (or the annotator's prompt), each with its score; boxes under the "
                                  "threshold are left out. A Kosmos-2.5 model reads each page instead: every line as a "
                                  "rectangle and its text (Label Studio's OCR template), each with its score.")
async def predict(request: Request, body: PredictBody):
    state = service_state(request)
    config = _labeling_config(state, body.label_config)  # a 503 before any image is fetched
    context = body.params.context if body.params else None
    threshold = min_score(config, context, state.default_min_score)
    if isinstance(config, ReadingConfig):
        engine_task, params = TaskInput(Task.OCR), GenerationParams(min_score=threshold)
        found_regions = partial(line_regions, config=config)
    else:
        plan = detection_plan(config, context)
        engine_task = TaskInput("detection", phrases=tuple(plan))
        params = GenerationParams(min_score=threshold, masks=config.masks)
        found_regions = partial(regions, config=config, plan=plan)
    version = _model_version(state)
    room = asyncio.Semaphore(state.settings.max_batch_requests)  # enough at once to fill a batch, not the whole queue

    async def predict_task(index: int, task: LabelStudioTask) -> dict:
        async with room:
            try:
                data = await task_image_bytes(task.data.get(config.image_field), state.settings, config.image_field)
                image = await decode_image(state, data)
                result = await state.generate(EngineRequest(image, engine_task, params), gone)
            except KosmosServeError as error:
                name = f"Task {task.id}" if task.id is not None else f"Task {index + 1} of the request"
                error.message = f"{name}: {error.message}"
                raise
        return prediction(found_regions(result), version)

    missing = [task.id if task.id is not None else i + 1 for i, task in enumerate(body.tasks)
               if config.image_field not in task.data]
    if missing:
        raise InvalidRequestError(f"Task {missing[0]} has no data.{config.image_field}, which the labeling config's "
                                  f"<Image name=\"{config.to_name}\" value=\"${config.image_field}\"> reads.")
    gone = DisconnectWatch(request)  # one watcher for all the tasks' queued requests
    jobs = [asyncio.ensure_future(predict_task(i, task)) for i, task in enumerate(body.tasks)]
    try:
        return {"results": await asyncio.gather(*jobs)}
    finally:
        for job in jobs:
            job.cancel()  # one failed: the others' queued work is dropped
        gone.close()


@router.post("/webhook", status_code=201,
             summary="Label Studio's events; Kosmos-2 is not trained from annotations here.")
async def webhook(body: WebhookBody):
    if body.action not in TRAIN_EVENTS:
        return JSONResponse({"status": "Unknown event"}, 200)
    return {"result": None, "status": "ok"}
