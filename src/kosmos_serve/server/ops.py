"""Operations: liveness, readiness, what is served and with which limits, Prometheus metrics, the task list."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kosmos_serve.server.common import service_state
from kosmos_serve.tasks import TASK_DESCRIPTIONS, TASK_INPUTS, Task

router = APIRouter()


@router.get("/v1/tasks", tags=["v1"], summary="The tasks of the model served and the inputs each needs.")
async def tasks(request: Request):
    return {"tasks": [{"name": task.value, "description": TASK_DESCRIPTIONS[task], "inputs": list(TASK_INPUTS[task])}
                      for task in _tasks(service_state(request))]}


@router.get("/health", tags=["operations"], summary="Liveness: the process answers.")
async def health():
    return {"status": "ok"}


@router.get("/ready", tags=["operations"], summary="Readiness: 200 once the model is loaded and warmed up, else 503.")
async def ready(request: Request):
    service_state(request).ready_batcher()
    return {"status": "ready"}


@router.get("/info", tags=["operations"], summary="Model, device, dtype, segmenter, version and limits.")
async def info(request: Request):
    state = service_state(request)
    engine, limits = state.engine, state.engine_settings
    return {
        "model": limits.model,
        "family": engine.family.name if engine else None,  # Kosmos-2 or Kosmos-2.5: its tasks are `tasks`
        "device": str(engine.device) if engine else None,
        "dtype": str(engine.dtype).removeprefix("torch.") if engine else None,
        "quantize": limits.quantize,
        "weight_formats": engine.weight_formats if engine else None,  # per part: what --quantize chose here
        "segmenter": _segmenter(state),  # masks: true needs one
        "version": request.app.version,
        "ready": state.batcher is not None,
        "limits": {
            "max_upload_bytes": state.settings.max_upload_bytes,
            "max_image_pixels": limits.max_image_pixels,
            "max_prompt_chars": limits.max_prompt_chars,
            "default_max_new_tokens": engine.defaults.max_new_tokens if engine else limits.max_new_tokens,
            "max_new_tokens_cap": limits.max_new_tokens_cap,
            "max_batch_size": state.settings.max_batch_requests,
            "max_queue": state.settings.max_queue,
            "request_timeout_s": state.settings.request_timeout_s,
        },
        "defaults": {  # request fields override them; see kosmos_serve.generation for where each comes from
            "default_prompt": state.default_prompt,
            "max_new_tokens": engine.defaults.max_new_tokens if engine else limits.max_new_tokens,
            "no_repeat_ngram_size": engine.defaults.no_repeat_ngram_size if engine else limits.no_repeat_ngram_size,
            "min_score": state.default_min_score,  # detection's, Label Studio's and Supervisely's threshold
            "nms_iou": state.default_nms_iou,  # and their suppression across phrases
        },
        "tasks": [task.value for task in _tasks(state)],
    }


def _tasks(state) -> tuple[Task, ...]:
    """The tasks of the model loaded; before it is, every task of every family."""
    return state.engine.family.tasks if state.engine else tuple(TASK_DESCRIPTIONS)


def _segmenter(state) -> dict | None:
    """The segmenter `masks: true` uses: its name and, once loaded, its model type; None without one."""
    name = state.engine_settings.segmenter
    if name is None:
        return None
    segmenter = state.engine.segmenter if state.engine else None
    return {"model": name, "model_type": segmenter.model_type if segmenter else None}


@router.get("/metrics", tags=["operations"], summary="Prometheus metrics.")
async def metrics(request: Request):
    return Response(service_state(request).metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
