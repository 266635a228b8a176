"""A real service on loopback: uvicorn in a thread, serving the session's tiny-model engine."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from kosmos_serve.server.app import create_app
from kosmos_serve.server.settings import ServerSettings


@contextlib.contextmanager
def running(app):
    """Serve `app` on a free loopback port until the block ends; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_ready(base_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{base_url}/ready").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the service never became ready")
        time.sleep(0.05)


@pytest.fixture
def serve_app():
    """Serve any app (its own engine or settings) on loopback: `with serve_app(app) as base_url`."""
    return running


@pytest.fixture
def serve(engine):
    """Start a service on the shared engine with the given settings; yields its ready base URL."""

    @contextlib.contextmanager
    def start(**settings):
        app = create_app(ServerSettings(**settings), engine.settings, engine=engine)
        with running(app) as base_url:
            wait_ready(base_url)
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
