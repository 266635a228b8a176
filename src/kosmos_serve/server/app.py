"""The app factory: the engine loads and warms up in the background, then the batcher starts.

`/health` answers at once; `/ready` and every model route answer 503 until the model is ready.
Errors are mapped to one JSON shape in one place: `{"error": {"code": ..., "message": ...}}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.demo import mount_demo
from kosmos_serve.engine import Engine, start_batcher
from kosmos_serve.engine.loading import quiet_transformers, set_threads
from kosmos_serve.errors import (
    KosmosServeError,
    PayloadTooLargeError,
    ServiceBusyError,
    UnauthorizedError,
    describe_validation_errors,
)
from kosmos_serve.generation import GenerationParams
from kosmos_serve.server import label_studio, openai, supervisely
from kosmos_serve.server.metrics import Metrics
from kosmos_serve.server.routes import router
from kosmos_serve.server.state import ServiceState

logger = logging.getLogger("kosmos_serve.server")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
OPEN_PATHS = {"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def create_app(
    settings: ServerSettings | None = None, engine_settings: EngineSettings | None = None, engine: Engine | None = None
) -> FastAPI:
    """The service; it loads the model from `engine_settings` unless an `engine` is handed in."""
    state = ServiceState(settings or ServerSettings(), engine_settings or EngineSettings(), Metrics(), engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(_start_model(state))
        yield
        loading.cancel()
        if state.batcher is not None:
            await state.batcher.stop()

    app = FastAPI(
        title="kosmos-serve",
        summary="Kosmos-2 grounded image understanding over HTTP.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.service = state
    _declare_configured_cap(app, state.engine_settings.max_new_tokens_cap)
    app.include_router(router)
    app.include_router(label_studio.router)  # Label Studio ML backend under /label-studio
    app.include_router(openai.router)  # OpenAI-compatible /v1/chat/completions and /v1/models
    app.include_router(supervisely.router)  # Supervisely's served-model protocol under /supervisely
    _add_error_handlers(app)
    app.middleware("http")(_observe_and_authorise)
    app.add_middleware(BodySizeLimit, max_bytes=state.settings.max_upload_bytes)
    if state.settings.demo:
        mount_demo(app, state)  # the Gradio page at /demo, on this app's model
    return app


def _declare_configured_cap(app: FastAPI, max_new_tokens_cap: int) -> None:
    """OpenAPI states the configured cap as `max_new_tokens`' maximum (the schemas know only the model's context)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            for schema in build().get("components", {}).get("schemas", {}).values():
                for name in ("max_new_tokens", "max_tokens", "max_completion_tokens"):  # the last two: OpenAI's
                    field = schema.get("properties", {}).get(name, {})
                    for option in [field, *field.get("anyOf", [])]:
                        if "maximum" in option:
                            option["maximum"] = max_new_tokens_cap
        return app.openapi_schema

    app.openapi = openapi


def app_from_environment() -> FastAPI:
    """The service as configured by environment variables (what `kosmos-serve serve` runs in each worker)."""
    settings = ServerSettings()
    configure_logging(settings.log_level)
    quiet_transformers()
    engine_settings = EngineSettings()
    set_threads(engine_settings.threads, settings.num_api_servers)
    return create_app(settings, engine_settings)


async def _start_model(state: ServiceState) -> None:
    try:
        if state.engine is None:
            state.engine = await asyncio.to_thread(Engine, state.engine_settings)
        if state.settings.warmup:
            await asyncio.to_thread(_warm_up, state.engine)
    except KosmosServeError as error:
        state.load_error = error.message
        logger.error("Model not loaded: %s", error.message)
        return
    except Exception:
        state.load_error = "The model failed to load; the service log has the details."
        logger.exception("Model not loaded")
        return
    state.batcher = start_batcher(state.engine, state.settings, state.metrics.observer())
    logger.info("Model %s ready on %s (%s)", state.engine.settings.model, state.engine.device, state.engine.dtype)


def _warm_up(engine: Engine) -> None:
    """One tiny generation, so the first real request does not pay for lazy initialisation."""
    engine.predict(Image.new("RGB", (64, 64), "white"), params=GenerationParams(max_new_tokens=2))
    engine.cache.clear()


async def _observe_and_authorise(request: Request, call_next):
    """Request id, API key, access log and request metrics around every route."""
    state: ServiceState = request.app.state.service
    rid = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
    token = request_id.set(rid)
    began = time.perf_counter()
    try:
        if state.settings.api_key is not None and request.url.path not in OPEN_PATHS:
            _check_api_key(request, state.settings.api_key.get_secret_value())
        response = await call_next(request)
    except KosmosServeError as error:  # raised before routing (API key)
        response = error_response(error, request.url.path)
    seconds = time.perf_counter() - began
    route = getattr(request.scope.get("route"), "path", "unmatched")
    state.metrics.record_request(route, response.status_code, seconds)
    response.headers["X-Request-ID"] = rid
    level = logging.DEBUG if request.url.path.startswith("/demo/") else logging.INFO  # the page's assets and polling
    logger.log(level, "%s %s -> %d in %.0f ms", request.method, request.url.path, response.status_code, seconds * 1000)
    request_id.reset(token)
    return response


def _check_api_key(request: Request, expected: str) -> None:
    given = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization", "")
    if given is None and authorization.lower().startswith("bearer "):
        given = authorization[len("bearer ") :].strip()
    if given is None and authorization.lower().startswith("basic "):  # Label Studio's ML backend auth: key as password
        given = _basic_auth_password(authorization)
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise UnauthorizedError("A valid API key is needed: send `Authorization: Bearer <key>` or `X-API-Key: <key>`.")


def _basic_auth_password(authorization: str) -> str | None:
    try:
        return base64.b64decode(authorization[len("basic ") :].strip(), validate=True).decode().partition(":")[2]
    except (binascii.Error, UnicodeDecodeError):
        return None


def error_response(error: KosmosServeError, path: str = "") -> JSONResponse:
    """The one JSON error shape (OpenAI's on the OpenAI-compatible paths); 503s carry Retry-After."""
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, ServiceBusyError) else None
    if isinstance(error, UnauthorizedError):
        headers = {"WWW-Authenticate": "Bearer"}
    if openai.is_openai_path(path):
        return openai.openai_error(error, headers)
    if label_studio.is_label_studio_path(path):
        return label_studio.error_response(error, headers)
    if supervisely.is_supervisely_path(path):
        return supervisely.error_response(error.status, error.message, headers)
    return JSONResponse({"error": {"code": error.code, "message": error.message}}, error.status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(KosmosServeError)
    async def domain_error(request: Request, error: KosmosServeError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        message = describe_validation_errors(error.errors())
        return JSONResponse({"error": {"code": "invalid_request", "message": message}}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if openai.is_openai_path(request.url.path):  # no such route or method under the OpenAI paths
            return openai.openai_http_error(error.status_code, str(error.detail))
        if label_studio.is_label_studio_path(request.url.path):
            return label_studio.http_error_response(error.status_code, str(error.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(error.detail)}}, error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        logger.exception("Unhandled error")
        message = f"Internal error; the service log has the details (request id {request_id.get()})."
        return JSONResponse({"error": {"code": "internal_error", "message": message}}, 500)


class BodySizeLimit:
    """ASGI middleware: a body over `max_bytes` is refused with 413, by its Content-Length or as it streams in.

    A body sent without a length (chunked) is counted as it arrives; once over the limit, reading it
    fails, and whatever the app answers to that failure (a parser's 400, say) is replaced by the 413.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = PayloadTooLargeError(f"The request body is larger than the {self.max_bytes}-byte upload limit.")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(too_large, scope["path"])(scope, receive, send)
        received = 0
        exceeded = answered = False

        async def counted_receive():
            nonlocal received, exceeded
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                exceeded = True
                raise too_large
            return message

        async def send_413_once_exceeded(message):
            nonlocal answered
            if not exceeded:
                return await send(message)
            if not answered:  # the app's own answer to the failed read is dropped, start and body alike
                answered = True
                await error_response(too_large, scope["path"])(scope, receive, send)

        try:
            await self.app(scope, counted_receive, send_413_once_exceeded)
        except PayloadTooLargeError:
            if not answered:
                await error_response(too_large, scope["path"])(scope, receive, send)


def configure_logging(level: str) -> None:
    """Log lines carry the request id they belong to."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    handler.addFilter(_add_request_id)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _add_request_id(record: logging.LogRecord) -> bool:
    record.request_id = request_id.get()
    return True


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kosmos-serve")
    except PackageNotFoundError:
        return "unknown"
