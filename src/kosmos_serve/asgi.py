"""The app a server process runs: the HTTP API (`kosmos_serve.server`) with the web demo mounted at /demo."""

from __future__ import annotations

from fastapi import FastAPI

from kosmos_serve.config import EngineSettings, ServerSettings, Settings
from kosmos_serve.demo import mount_demo
from kosmos_serve.engine import Engine
from kosmos_serve.server.app import create_api
from kosmos_serve.server.logs import configure_logging


def create_app(
    settings: ServerSettings | None = None, engine_settings: EngineSettings | None = None, engine: Engine | None = None
) -> FastAPI:
    """The service: the HTTP API, and the demo page at /demo when `settings.demo` (and gradio is installed)."""
    app = create_api(settings, engine_settings, engine)
    state = app.state.service
    if state.settings.demo:
        mount_demo(app, state)
    return app


def app_for_worker(settings: Settings) -> FastAPI:
    """The app of one uvicorn worker process: logging at `settings.log_level`, then the service `settings` describe."""
    configure_logging(settings.log_level)
    return create_app(settings, settings)
