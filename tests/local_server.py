"""Run an app on loopback in a background thread, or a `kosmos-serve` command as a process (for tests and benchmarks)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import uvicorn


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", startup_timeout: float = 30.0, ready: bool = True,
                    ready_timeout: float = 300.0) -> Iterator[str]:
    """Serve `app` on a free port of `host` until the block ends; yields its base URL.

    With `ready` (the default) it yields once `/ready` answers 200, the model loaded and warmed up, so a test's
    first request never meets the loading 503; `ready=False` yields as soon as the port listens (tests of the
    loading state, or of a model that cannot load).
    """
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    base_url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while ready and httpx.get(f"{base_url}/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the service never became ready")
            time.sleep(0.05)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def service_process(args: list[str], env: dict[str, str] | None = None, cwd=None) -> Iterator[SimpleNamespace]:
    """`kosmos-serve ARGS` as a real process on a free port, ready (its /ready answered 200) until the block ends.

    "{port}" in `args` or `env` values becomes the port. Yields `service`: `service.url` is its address; once the
    block ends the process is stopped (SIGTERM) and `service.output` holds everything it printed.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    process = subprocess.Popen(
        [sys.executable, "-m", "kosmos_serve.cli", *(arg.replace("{port}", port) for arg in args)],
        env={**os.environ, **{name: value.replace("{port}", port) for name, value in (env or {}).items()}},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
    )
    service = SimpleNamespace(url=f"http://127.0.0.1:{port}", output="")
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{service.url}/ready").status_code == 200:
                    break
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.2)
        yield service
    finally:
        process.terminate()
        service.output = process.communicate(timeout=30)[0]
