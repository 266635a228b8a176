"""Label Studio ML backend under `/label-studio`: the routes of HumanSignal's `label-studio-ml-backend`.

Label Studio is given `http://host:8000/label-studio` as a model's URL and calls `GET /health`,
`POST /setup`, `POST /predict` and `POST /webhook` below it. `/predict` reads the project's labeling
config: its `<RectangleLabels>` control on an `<Image>`. Each `<Label>` is a phrase for Kosmos-2's
detection task (one grounded prompt per phrase, one batch per image); a label's `predicted_values`
(comma-separated) or `hint` replaces its value as the phrase, and a `<TextArea>` on the same image,
when an annotator has typed in it (interactive pre-annotation), replaces the labels' phrases with its
own lines. Each box comes back as a `rectanglelabels` region in percent of the image.

Images in task data: `data:` URIs, Label Studio uploads (`/data/upload/...`) and local-files URLs
(`/data/local-files/?d=...`), read from `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT` when there and
otherwise fetched from `LABEL_STUDIO_URL` with `LABEL_STUDIO_API_KEY`. No other host is ever fetched.

Errors come in the ML backend's own shape, `{"status": ..., "detail": ...}` (plus the service's
`code`), with the service's status codes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import httpx
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kosmos_serve.config import ServerSettings
from kosmos_serve.engine import Request as EngineRequest
from kosmos_serve.engine import Result
from kosmos_serve.errors import (
    InvalidImageError,
    InvalidRequestError,
    KosmosServeError,
    PayloadTooLargeError,
    ServiceBusyError,
    describe_validation_errors,
)
from kosmos_serve.images import load_image
from kosmos_serve.server.image_sources import decode_base64_image, fetch_image
from kosmos_serve.server.state import ServiceState
from kosmos_serve.tasks import TaskInput

logger = logging.getLogger("kosmos_serve.server")

PREFIX = "/label-studio"
MODEL_CLASS = "Kosmos2"  # what /health names, as the ML backend names its model class
TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")
# Kosmos-2 writes a box as location tokens and gives no probability for it; every box it writes is its
# answer. Regions carry this constant (a `model_score_threshold` never hides them); a task's score is
# the mean of its regions', 0 when the model boxed nothing, so Label Studio's lowest-score-first sampling
# brings the images the model found nothing in to an annotator first.
REGION_SCORE = 1.0
CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")
PROMPT_SEPARATORS = re.compile(r"[\n;,.]")


# ------------------------------------------------------------------------------------------------ errors


def is_label_studio_path(path: str) -> bool:
    """Whether `path` belongs to the Label Studio backend (its errors take the ML backend's shape)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_response(error: KosmosServeError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The ML backend's error shape, `{"status", "detail"}`, plus the service's error code."""
    if isinstance(error, ServiceBusyError) and headers is None:
        headers = {"Retry-After": str(error.retry_after)}
    body = {"status": error.status, "detail": error.message, "code": error.code}
    return JSONResponse(body, error.status, headers=headers)


def http_error_response(status: int, detail: str) -> JSONResponse:
    """No such route or method under the prefix, or an unparsable body, in the ML backend's shape."""
    code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    return JSONResponse({"status": status, "detail": detail, "code": code}, status)


class LabelStudioRoute(APIRoute):
    """Answers this router's errors (bad bodies, domain errors) in the ML backend's shape instead of the service's."""

    def get_route_handler(self):
        handle = super().get_route_handler()

        async def handle_in_label_studio_shape(request: Request):
            try:
                return await handle(request)
            except RequestValidationError as error:
                return error_response(InvalidRequestError(describe_validation_errors(error.errors())))
            except KosmosServeError as error:
                return error_response(error)
            except StarletteHTTPException as error:  # FastAPI's 400 for a body it cannot parse (not UTF-8, say)
                return http_error_response(error.status_code, str(error.detail))
            except Exception:
                logger.exception("Label Studio route failed")
                body = {"status": 500, "detail": "Internal error; the service log has the details.",
                        "code": "internal_error"}
                return JSONResponse(body, 500)

        return handle_in_label_studio_shape


router = APIRouter(prefix=PREFIX, tags=["label-studio"], route_class=LabelStudioRoute)


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


# ------------------------------------------------------------------------------------------------ labeling config


@dataclass(frozen=True)
class LabelSpec:
    """A `<Label>`: the value a region carries and the phrases Kosmos-2 is asked to ground for it."""

    value: str
    phrases: tuple[str, ...]


@dataclass(frozen=True)
class DetectionConfig:
    """What `/predict` needs from a labeling config."""

    from_name: str  # the <RectangleLabels> control
    to_name: str  # the <Image> it labels
    image_field: str  # the task data key the image reads: value="$image" -> "image"
    labels: tuple[LabelSpec, ...]
    prompt_from: str | None = None  # a <TextArea> on the same image, whose text replaces the labels' phrases


def parse_labeling_config(xml: str) -> DetectionConfig:
    """The first `<RectangleLabels>` on an `<Image>`, its labels and phrases, and a `<TextArea>` prompt if any.

    >>> config = parse_labeling_config('<View><Image name="img" value="$photo"/><RectangleLabels name="box" '
    ...     'toName="img"><Label value="Car" predicted_values="car, truck"/><Label value="Dog" hint="a dog"/>'
    ...     '<Label value="cat"/></RectangleLabels></View>')
    >>> config.from_name, config.to_name, config.image_field
    ('box', 'img', 'photo')
    >>> [(label.value, label.phrases) for label in config.labels]
    [('Car', ('car', 'truck')), ('Dog', ('a dog',)), ('cat', ('cat',))]
    """
    if "<!DOCTYPE" in xml.upper() or "<!ENTITY" in xml.upper():
        raise InvalidRequestError("The labeling config declares a DOCTYPE or entities, which Label Studio configs "
                                  "never need; remove them.")
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as error:
        raise InvalidRequestError(f"The labeling config is not well-formed XML ({error}).") from None
    tags = list(root.iter())
    images = {tag.get("name"): tag for tag in tags if tag.tag.lower() == "image" and tag.get("name")}
    controls = [tag for tag in tags if tag.tag.lower() == "rectanglelabels"]
    example = ('<RectangleLabels name="label" toName="image"><Label value="cat"/></RectangleLabels> '
               'for <Image name="image" value="$image"/>')
    if not controls:
        raise InvalidRequestError(f"The labeling config has no <RectangleLabels> control, which is what this backend "
                                  f"predicts (boxes); add one, e.g. {example}.")
    for control in controls:
        targets = [name.strip() for name in (control.get("toName") or "").split(",") if name.strip()]
        if len(targets) > 1 and any(name in images for name in targets):
            raise InvalidRequestError(f"<RectangleLabels name=\"{control.get('name')}\"> names {len(targets)} objects "
                                      f"({', '.join(targets)}); point it at one <Image>.")
        if targets and targets[0] in images:
            return _detection_config(control, images[targets[0]], tags)
    raise InvalidRequestError(f"No <RectangleLabels> in the labeling config points at an <Image> (toName must be an "
                              f"<Image>'s name), e.g. {example}.")


def _detection_config(control: ElementTree.Element, image: ElementTree.Element, tags) -> DetectionConfig:
    from_name, to_name = control.get("name"), image.get("name")
    if not from_name:
        raise InvalidRequestError("The <RectangleLabels> control has no name; give it one (name=\"label\").")
    value = image.get("value") or ""
    if not value.startswith("$") or len(value) < 2:
        raise InvalidRequestError(f"<Image name=\"{to_name}\"> must read its image from the task data "
                                  f"(value=\"$image\"); got value=\"{value}\".")
    labels = tuple(_label_spec(label) for label in control.iter() if label.tag.lower() == "label")
    if not labels:
        raise InvalidRequestError(f"<RectangleLabels name=\"{from_name}\"> has no <Label> to detect; add one "
                                  f"(<Label value=\"cat\"/>); labels loaded from task data are not supported.")
    prompt = next((tag.get("name") for tag in tags if tag.tag.lower() == "textarea" and tag.get("name")
                   and to_name in [name.strip() for name in (tag.get("toName") or "").split(",")]), None)
    return DetectionConfig(from_name, to_name, value[1:], labels, prompt)


def _label_spec(label: ElementTree.Element) -> LabelSpec:
    value = (label.get("value") or "").strip()
    if not value:
        raise InvalidRequestError("A <Label> in the <RectangleLabels> control has no value; give each label one.")
    predicted = [name.strip() for name in (label.get("predicted_values") or "").split(",") if name.strip()]
    hint = (label.get("hint") or "").strip()
    return LabelSpec(value, tuple(predicted) or ((hint,) if hint else (value,)))


def detection_plan(config: DetectionConfig, context: dict[str, Any] | None) -> dict[str, LabelSpec | None]:
    """The phrases to ground, each with the label its boxes carry (None: none fits, the annotator picks).

    The annotator's text in the config's `<TextArea>`, when the interactive context carries it, is
    one phrase per line (or per comma); otherwise every label's phrases.

    >>> config = DetectionConfig("label", "image", "image", (LabelSpec("circle", ("circle",)),
    ...                          LabelSpec("square", ("a square",))), prompt_from="prompt")
    >>> list(detection_plan(config, None))
    ['circle', 'a square']
    >>> context = {"result": [{"from_name": "prompt", "type": "textarea", "value": {"text": ["the blue circle, a star"]}}]}
    >>> [(phrase, label and label.value) for phrase, label in detection_plan(config, context).items()]
    [('the blue circle', 'circle'), ('a star', None)]
    """
    typed = [part.strip() for part in PROMPT_SEPARATORS.split(_prompt_text(config, context)) if part.strip()]
    if typed:
        return {phrase: label_for_phrase(phrase, config.labels) for phrase in typed}
    plan: dict[str, LabelSpec | None] = {}
    for label in config.labels:
        for phrase in label.phrases:
            plan.setdefault(phrase, label)
    return plan


def _prompt_text(config: DetectionConfig, context: dict[str, Any] | None) -> str:
    if not config.prompt_from or not isinstance(context, dict) or not isinstance(context.get("result"), list):
        return ""
    for region in context["result"]:
        if isinstance(region, dict) and region.get("from_name") == config.prompt_from:
            text = (region.get("value") or {}).get("text") if isinstance(region.get("value"), dict) else None
            if isinstance(text, list):
                return "\n".join(str(line) for line in text)
            if isinstance(text, str):
                return text
    return ""


def label_for_phrase(phrase: str, labels: tuple[LabelSpec, ...]) -> LabelSpec | None:
    """The label a typed phrase names (its value or a phrase of it, as whole words; the longest wins), else the only one.

    >>> labels = (LabelSpec("circle", ("circle",)), LabelSpec("blue circle", ("blue circle",)))
    >>> label_for_phrase("the Blue Circle", labels).value
    'blue circle'
    >>> label_for_phrase("a star", labels) is None
    True
    """
    best, best_length = None, 0
    for label in labels:
        for name in (label.value, *label.phrases):
            if len(name) > best_length and re.search(rf"(?<!\w){re.escape(name.lower())}(?!\w)", phrase.lower()):
                best, best_length = label, len(name)
    return best if best is not None else (labels[0] if len(labels) == 1 else None)


# ------------------------------------------------------------------------------------------------ predictions


def model_version(model: str, quantize: str = "none") -> str:
    """`kosmos-2:<model>`: the hub id, or a local folder's name, and `+int8` or `+auto` when quantized.

    >>> model_version("microsoft/kosmos-2-patch14-224"), model_version("/models/my-kosmos/", "int8")
    ('kosmos-2:microsoft/kosmos-2-patch14-224', 'kosmos-2:my-kosmos+int8')
    """
    name = Path(model).name if model.startswith((".", "/", "~")) or os.path.isdir(model) else model
    return f"kosmos-2:{name}" + ("" if quantize == "none" else f"+{quantize}")


def regions(result: Result, config: DetectionConfig, plan: dict[str, LabelSpec | None]) -> list[dict]:
    """Each box of each grounded phrase as a `rectanglelabels` region, in percent of the original image."""
    width, height = result.image_size
    found = []
    for entity in result.entities:
        if entity.phrase not in plan:
            continue
        label = plan[entity.phrase]
        for x1, y1, x2, y2 in entity.boxes:
            x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
            region = {
                "id": uuid.uuid4().hex[:10],
                "from_name": config.from_name,
                "to_name": config.to_name,
                "type": "rectanglelabels",
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "value": {"x": 100 * x1, "y": 100 * y1, "width": 100 * (x2 - x1), "height": 100 * (y2 - y1),
                          "rotation": 0, "rectanglelabels": [label.value] if label else []},
                "score": REGION_SCORE,
            }
            if label is None:  # a typed phrase no label fits: the box comes unlabelled, the phrase as its note
                region["meta"] = {"text": [entity.phrase]}
            found.append(region)
    return found


def prediction(found: list[dict], version: str) -> dict:
    """One task's prediction: its regions, their mean score (0 when none) and the model version."""
    score = sum(region["score"] for region in found) / len(found) if found else 0.0
    return {"result": found, "score": score, "model_version": version}


# ------------------------------------------------------------------------------------------------ task images


def image_source(reference: str) -> Literal["data", "label_studio", "local_files", "url", "cloud", "unknown"]:
    """What kind of image reference a task holds.

    >>> [image_source(r) for r in ["data:image/png;base64,aGk=", "/data/upload/1/a.png",
    ...  "/data/local-files/?d=img/a.png", "http://ls:8080/data/upload/1/a.png", "s3://bucket/a.png", "a.png"]]
    ['data', 'label_studio', 'local_files', 'url', 'cloud', 'unknown']
    """
    lowered = reference.lower()
    if lowered.startswith("data:"):
        return "data"
    if lowered.startswith(CLOUD_SCHEMES):
        return "cloud"
    if lowered.startswith(("http://", "https://")):
        return "url"
    if reference.startswith("/data/local-files") and "d=" in urlsplit(reference).query:
        return "local_files"
    if reference.startswith(("/data/", "/upload/", "upload/")):
        return "label_studio"
    return "unknown"


def local_file_path(reference: str, root: str) -> Path:
    """The file a `/data/local-files/?d=...` URL names under `root`, as Label Studio resolves it; never outside.

    >>> str(local_file_path("/data/local-files/?d=scenes/a.png", "/srv/images"))
    '/srv/images/scenes/a.png'
    >>> local_file_path("/data/local-files/?d=../../etc/passwd", "/srv/images")
    Traceback (most recent call last):
    ...
    kosmos_serve.errors.InvalidImageError: The local file ../../etc/passwd lies outside the document root (Label Studio's local files are relative to it).
    """
    values = parse_qs(urlsplit(reference).query, keep_blank_values=True).get("d")
    relative = values[-1] if values else ""
    if not relative:
        raise InvalidImageError(f"The local-files URL {reference} names no file (?d=path/to/image.png).")
    base = os.path.abspath(root)
    path = os.path.abspath(os.path.join(base, posixpath.normpath(relative).lstrip("/")))
    if os.path.commonpath([path, base]) != base:
        raise InvalidImageError(f"The local file {relative} lies outside the document root (Label Studio's local "
                                f"files are relative to it).")
    return Path(path)


async def task_image_bytes(reference: Any, settings: ServerSettings, field: str) -> bytes:
    """The bytes of a task's image: decoded, read under the document root, or fetched from Label Studio only."""
    if not isinstance(reference, str) or not reference.strip():
        raise InvalidRequestError(f"data.{field} must be the image's URL or data: URI (the labeling config's <Image> "
                                  f"reads ${field}); got {type(reference).__name__}.")
    source = image_source(reference)
    if source == "data":
        return decode_base64_image(reference)
    if source == "local_files":
        local_file_path(reference, "/root-of-the-check")  # a path that leaves the root is never read nor fetched
        root = settings.label_studio_local_files_document_root
        if root and os.path.abspath(root) != os.path.abspath(os.sep):  # "/" would make every file readable
            path = local_file_path(reference, root)
            if path.is_file():
                return await asyncio.to_thread(_read_file, path, settings.max_upload_bytes)
            if not settings.label_studio_url:
                raise InvalidImageError(f"The local file {path} does not exist (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT).")
    if source in ("local_files", "label_studio", "url"):
        return await _fetch_from_label_studio(reference, settings)
    if source == "cloud":
        raise InvalidImageError(f"The image {reference} is in cloud storage, which this backend does not fetch; serve "
                                f"it through Label Studio (local files or uploads) or send it as a data: URI.")
    raise InvalidImageError(f"data.{field} {reference[:80]!r} is neither a data: URI nor a Label Studio upload or "
                            f"local-files URL.")


def _read_file(path: Path, max_bytes: int) -> bytes:
    if path.stat().st_size > max_bytes:
        raise PayloadTooLargeError(f"The local file {path} is larger than the {max_bytes}-byte upload limit.")
    return path.read_bytes()


async def _fetch_from_label_studio(reference: str, settings: ServerSettings) -> bytes:
    base = settings.label_studio_url
    own = urlsplit(base or "")
    if image_source(reference) == "url":
        parts = urlsplit(reference)
        if not base or (parts.scheme.lower(), parts.netloc.lower()) != (own.scheme.lower(), own.netloc.lower()):
            raise InvalidImageError(f"The image {reference[:200]} is not on Label Studio "
                                    f"({base or 'LABEL_STUDIO_URL is not set'}); this service fetches task images from "
                                    f"Label Studio only. Import the image into Label Studio or send it as a data: URI.")
        url = reference
    elif not base:
        raise InvalidImageError(f"The image {reference[:200]} is served by Label Studio; set LABEL_STUDIO_URL (and "
                                f"LABEL_STUDIO_API_KEY) so this service can fetch it from there.")
    else:
        path = reference.lstrip("/")
        url = f"{base}/data/{path}" if path.startswith("upload/") else f"{base}/{path}"  # upload/...: old tasks
    headers = await _authorization(settings)
    try:
        return await fetch_image(url, [own.netloc.lower()], settings.max_upload_bytes, settings.image_fetch_timeout_s,
                                 headers=headers)
    except InvalidImageError as error:
        if "HTTP 401" in error.message or "HTTP 403" in error.message:
            error.message += (" Set LABEL_STUDIO_API_KEY to a Label Studio token." if settings.label_studio_api_key is None
                              else " Label Studio refused LABEL_STUDIO_API_KEY (a legacy token works only where the "
                                   "organization allows legacy tokens; a personal access token always does).")
        raise


# Personal access tokens (JWT refresh tokens) are exchanged for short-lived access tokens, as the SDK does.
_access_tokens: dict[tuple[str, str], tuple[str, float]] = {}


async def _authorization(settings: ServerSettings) -> dict[str, str]:
    if settings.label_studio_api_key is None:
        return {}
    key = settings.label_studio_api_key.get_secret_value()
    if _jwt_expiry(key) is None:
        return {"Authorization": f"Token {key}"}  # a legacy token
    cached = _access_tokens.get((settings.label_studio_url, key))
    if cached is None or cached[1] < time.time() + 30:
        cached = await _refresh(settings.label_studio_url, key, settings.image_fetch_timeout_s)
        _access_tokens[(settings.label_studio_url, key)] = cached
    return {"Authorization": f"Bearer {cached[0]}"}


async def _refresh(base: str, refresh_token: str, timeout: float) -> tuple[str, float]:
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            answer = await client.post(f"{base}/api/token/refresh/", json={"refresh": refresh_token})
        access = answer.json().get("access") if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        access = None
        answer = None
    if not isinstance(access, str):
        status = f"HTTP {answer.status_code}" if answer is not None else "no answer"
        raise InvalidImageError(f"Label Studio refused LABEL_STUDIO_API_KEY, a personal access token, when asked for an "
                                f"access token ({status}); check the token in Label Studio's Account & Settings.")
    return access, _jwt_expiry(access) or time.time() + 60


def _jwt_expiry(token: str) -> float | None:
    """The `exp` of a JSON web token, or None when `token` is not one (a legacy Label Studio token)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return float(payload.get("exp", time.time() + 60))
    except (binascii.Error, ValueError, TypeError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------------ routes


def _state(request: Request) -> ServiceState:
    return request.app.state.service


def _model_version(state: ServiceState) -> str:
    return model_version(state.engine_settings.model, state.engine_settings.quantize)


@router.get("/health", summary="Liveness as the ML backend reports it: `UP` once the model is ready (else 503).")
@router.get("/", include_in_schema=False)
async def health(request: Request):
    _state(request).ready_batcher()
    return {"status": "UP", "model_class": MODEL_CLASS}


@router.post("/setup", summary="Label Studio connects a project: checks its labeling config, answers the model version.")
async def setup(request: Request, body: SetupBody):
    parse_labeling_config(body.schema_)
    return {"model_version": _model_version(_state(request))}


@router.post("/predict", summary="Boxes for each task's image, one phrase per label (or the annotator's prompt).")
async def predict(request: Request, body: PredictBody):
    state = _state(request)
    config = parse_labeling_config(body.label_config)
    context = body.params.context if body.params else None
    plan = detection_plan(config, context)
    version = _model_version(state)
    state.ready_batcher()  # a 503 before any image is fetched
    room = asyncio.Semaphore(state.settings.max_batch_requests)  # enough at once to fill a batch, not the whole queue

    async def predict_task(index: int, task: LabelStudioTask) -> dict:
        async with room:
            try:
                data = await task_image_bytes(task.data.get(config.image_field), state.settings, config.image_field)
                image = await run_in_threadpool(
                    functools.partial(load_image, data, max_pixels=state.engine_settings.max_image_pixels))
                engine_request = EngineRequest(image, TaskInput("detection", phrases=tuple(plan)))
                result = await state.generate(engine_request, lambda: asyncio.shield(gone))
            except KosmosServeError as error:
                name = f"Task {task.id}" if task.id is not None else f"Task {index + 1} of the request"
                error.message = f"{name}: {error.message}"
                raise
        return prediction(regions(result, config, plan), version)

    missing = [task.id if task.id is not None else i + 1 for i, task in enumerate(body.tasks)
               if config.image_field not in task.data]
    if missing:
        raise InvalidRequestError(f"Task {missing[0]} has no data.{config.image_field}, which the labeling config's "
                                  f"<Image name=\"{config.to_name}\" value=\"${config.image_field}\"> reads.")
    gone = asyncio.ensure_future(_client_gone(request))  # one watcher for all the tasks' queued requests
    jobs = [asyncio.ensure_future(predict_task(i, task)) for i, task in enumerate(body.tasks)]
    try:
        return {"results": await asyncio.gather(*jobs)}
    finally:
        for job in jobs:
            job.cancel()  # one failed: the others' queued work is dropped
        gone.cancel()


@router.post("/webhook", status_code=201, summary="Label Studio's events; Kosmos-2 is not trained from annotations here.")
async def webhook(body: WebhookBody):
    if body.action not in TRAIN_EVENTS:
        return JSONResponse({"status": "Unknown event"}, 200)
    return {"result": None, "status": "ok"}


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
