"""The HTTP API's factory: the engine loads and warms up in the background, then the batcher starts.

`/health` answers at once; `/ready` and every model route answer 503 until the model is ready. Every
error is answered through the one error map (`server/errors.py`), in the wire shape of the protocol
whose path it is. The web demo is not part of the API: `kosmos_serve.asgi` mounts it. The interactive docs
(`/docs`, `/redoc`) load their scripts and styles from the service itself (fastapi-offline's copies), so they work
on a machine without internet access.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from PIL import Image

from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.engine import Engine, start_batcher, start_engine
from kosmos_serve.errors import KosmosServeError
from kosmos_serve.generation import GenerationParams
from kosmos_serve.server import label_studio, openai, ops, routes, supervisely
from kosmos_serve.server.errors import ErrorMap, add_error_map
from kosmos_serve.server.metrics import Metrics
from kosmos_serve.server.middleware import DOCS_ASSETS, BodySizeLimit, observe_and_authorise
from kosmos_serve.server.state import ServiceState

logger = logging.getLogger("kosmos_serve.server")


def create_api(
    settings: ServerSettings | None = None, engine_settings: EngineSettings | None = None, engine: Engine | None = None
) -> FastAPI:
    """The HTTP API; it loads the model from `engine_settings` unless an `engine` is handed in."""
    state = ServiceState(settings or ServerSettings(), engine_settings or EngineSettings(), Metrics(), engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(_start_model(state))
        yield
        loading.cancel()
        if state.batcher is not None:
            await state.batcher.stop()

    app = FastAPIOffline(  # FastAPI, with the docs' assets served from DOCS_ASSETS instead of a CDN
        title="kosmos-serve",
        summary="Kosmos-2 grounded image understanding over HTTP.",
        version=_version(),
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
        swagger_ui_parameters={"validatorUrl": None},  # else Swagger UI shows swagger.io's validator badge off loopback
    )
    app.state.service = state
    _declare_configured_cap(app, state.engine_settings.max_new_tokens_cap)
    app.include_router(routes.router)  # the reference's /predict and the /v1/generate JSON API
    app.include_router(ops.router)  # /health, /ready, /info, /metrics, /v1/tasks
    app.include_router(label_studio.router)  # Label Studio ML backend under /label-studio
    app.include_router(openai.router)  # OpenAI-compatible /v1/chat/completions and /v1/models
    app.include_router(supervisely.router)  # Supervisely's served-model protocol under /supervisely
    error_map = add_error_map(app, service_error_map())
    app.middleware("http")(observe_and_authorise)
    app.add_middleware(BodySizeLimit, max_bytes=state.settings.max_upload_bytes, error_map=error_map)
    return app


def service_error_map() -> ErrorMap:
    """The service's one error map: each protocol's wire shape on its own paths, the service's own elsewhere."""
    return ErrorMap([openai.ERROR_FORMAT, label_studio.ERROR_FORMAT, supervisely.ERROR_FORMAT])


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


async def _start_model(state: ServiceState) -> None:
    try:
        if state.engine is None:
            state.engine = await asyncio.to_thread(start_engine, state.engine_settings, state.settings.num_api_servers)
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


def _version() -> str:
    try:
        return version("kosmos-serve")
    except PackageNotFoundError:
        return "unknown"
