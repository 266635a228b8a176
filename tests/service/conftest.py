"""A real service on loopback: uvicorn in a thread, serving the session's tiny-model engine."""

from __future__ import annotations

import contextlib
import io

import pytest
from local_server import serve_in_thread

from kosmos_serve.asgi import create_app
from kosmos_serve.config import ServerSettings


@pytest.fixture
def serve_app():
    """Serve any app (its own engine or settings) on loopback: `with serve_app(app) as base_url`."""
    return serve_in_thread


@pytest.fixture
def serve(engine):
    """Start a service on the shared engine with the given settings; yields its ready base URL."""

    @contextlib.contextmanager
    def start(**settings):
        app = create_app(ServerSettings(**{"demo": False, **settings}), engine.settings, engine=engine)
        with serve_in_thread(app) as base_url:
            yield base_url

    return start


@pytest.fixture(scope="module")
def png_bytes(sample_images):
    """The sample images as PNG files."""
    files = []
    for image in sample_images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files
