"""What the reliability tests share: the real service as a subprocess, and what every answer must look like.

The service runs on the demo model shipped in the package.

`start_service(env, log_dir)` runs `python -m kosmos_serve.cli serve --model demo` on a free port
of 127.0.0.1, waits for `GET /ready` to answer 200 and stops the process (SIGTERM, then SIGKILL)
when the block ends. Its output goes to a file, never to an unread pipe: a full pipe would block
the service's logging, and so the service, under the hundreds of requests these tests send.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
# What every service here runs with: no web demo, short generations, small limits that tests can reach cheaply.
BASE_ENV = {
    "KOSMOS_DEMO": "false",
    "KOSMOS_DEVICE": "cpu",
    "KOSMOS_MAX_NEW_TOKENS": "8",  # the default of a request that does not say (POST /predict)
    "KOSMOS_THREADS": "1",  # the machine's cores are shared with the client threads of the test
    "LOG_LEVEL": "INFO",
    "HF_HUB_OFFLINE": "1",
}
# The reference service's own variables, which `serve` reads without the KOSMOS_ prefix.
SERVICE_VARIABLES = {"PORT", "LOG_LEVEL", "NUM_API_SERVERS", "MAX_BATCH_SIZE", "DEFAULT_PROMPT"}
# The service that the bad-input corpus and the fuzzing share (both read these limits).
MAX_PROMPT_CHARS = 200
MAX_NEW_TOKENS_CAP = 32
MAX_UPLOAD_BYTES = 4 * 1024 * 1024
SHARED_ENV = {
    "KOSMOS_MAX_PROMPT_CHARS": str(MAX_PROMPT_CHARS),
    "KOSMOS_MAX_NEW_TOKENS_CAP": str(MAX_NEW_TOKENS_CAP),
    "KOSMOS_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
    "MAX_BATCH_SIZE": "2",
}
# Text that must never reach a client: tracebacks, Python reprs, framework internals.
INTERNAL_TEXT = ("Traceback", "<class", "Expected UploadFile", "site-packages", 'File "/', "object at 0x")
PREDICT_KEYS = {"output", "generated_text", "entities", "scores"}
GENERATE_KEYS = {"task", "prompt", "text", "answer", "raw_text", "entities", "markdown", "image_size",
                 "generated_tokens", "image_cached", "timings"}


@dataclass
class Service:
    """A running `kosmos-serve serve` process: its address, process and log file."""

    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """Resident memory of the service process, from /proc/PID/status (VmRSS, in kB there)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line in /proc status")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def inherited_environment() -> dict[str, str]:
    """This process's environment less any service setting, so that a developer's shell cannot change the
    service under test (KOSMOS_API_KEY or KOSMOS_ALLOWED_IMAGE_HOSTS, say)."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith("KOSMOS_") and name not in SERVICE_VARIABLES}


@contextlib.contextmanager
def start_service(env: dict[str, str], log_dir: Path) -> Iterator[Service]:
    """`kosmos-serve serve --model demo` with `env` on top of BASE_ENV, ready; stopped when the block ends."""
    port = free_port()
    log_path = log_dir / f"service-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "kosmos_serve.cli", "serve", "--model", "demo", "--host", "127.0.0.1",
             "--port", str(port)],
            env={**inherited_environment(), **BASE_ENV, **env}, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    service = Service(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"the service exited at start:\n{service.log()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{service.url}/ready", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"the service never became ready:\n{service.log()}"
            time.sleep(0.2)
        yield service
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process we started (by its pid), SIGKILL it if it has not gone within STOP_TIMEOUT_S."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)



def assert_error_shape(response) -> dict:
    """The one error shape `{"error": {"code", "message"}}`, nothing internal in it; returns the inner object."""
    assert_no_internal_text(response)
    assert content_type(response).startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message"}, body
    assert isinstance(error["code"], str) and error["code"], body
    assert isinstance(error["message"], str) and error["message"], body
    return error


def content_type(response) -> str:
    """The Content-Type of an httpx response or of a schemathesis one (whose header values are lists)."""
    for name, value in response.headers.items():
        if name.lower() == "content-type":
            return value[0] if isinstance(value, list) else value
    return ""


def assert_no_internal_text(response) -> None:
    leaked = [fragment for fragment in INTERNAL_TEXT if fragment in response.text]
    assert not leaked, f"internal text {leaked} in a {response.status_code} answer: {response.text[:500]}"


def assert_result_body(path: str, body: dict) -> None:
    """A 200 answer has the documented keys with the documented types."""
    if path == "/predict":
        assert set(body) == PREDICT_KEYS, body
        assert isinstance(body["output"], str) and isinstance(body["generated_text"], str)
        assert isinstance(body["entities"], list) and isinstance(body["scores"], list)
        assert [len(boxes) for _, _, boxes in body["entities"]] == [len(scores) for scores in body["scores"]], body
        return
    assert GENERATE_KEYS <= set(body) <= GENERATE_KEYS | {"annotated_image"}, body
    width, height = body["image_size"]
    assert isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
    assert isinstance(body["generated_tokens"], int) and body["generated_tokens"] >= 0
    assert isinstance(body["text"], str) and isinstance(body["raw_text"], str)
    for entity in body["entities"]:
        assert {"phrase", "span", "boxes", "pixel_boxes", "scores"} <= set(entity), entity
        assert len(entity["scores"]) == len(entity["boxes"]) and all(0.0 <= s <= 1.0 for s in entity["scores"]), entity
        for box in entity["boxes"]:
            assert all(0.0 <= value <= 1.0 for value in box), entity


def assert_answer_ok(response, path: str) -> None:
    """Any answer of the service: a 2xx with a valid body, or a 4xx with the error shape; never a 5xx."""
    assert response.status_code < 500, f"{response.status_code} on {path}: {response.text[:500]}"
    if response.status_code >= 400:
        assert_error_shape(response)
        return
    assert_no_internal_text(response)
    if content_type(response).startswith("text/event-stream"):
        assert "event: result" in response.text and "event: error" not in response.text, response.text[-500:]
        return
    assert_result_body(path, response.json())
