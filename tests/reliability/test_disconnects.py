"""Clients that leave: mid-upload (a raw socket closed halfway through its body) and while queued (client timeouts).

Neither may hurt the service: it stays healthy, closes the sockets, drops the work of callers that have
gone, logs no traceback, and answers the next request.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import struct
import threading
import time

import httpx
import pytest

from . import bad_images
from .support import Service, assert_result_body

ENV = {"MAX_BATCH_SIZE": "1", "KOSMOS_BATCH_TIMEOUT_MS": "0", "KOSMOS_MAX_UPLOAD_BYTES": str(8 * 1024 * 1024)}
PNG, _ = bad_images.valid_png()
DECLARED_BYTES = 2 * 1024 * 1024  # under the upload cap: the service must start reading, then lose the client
SENT_BYTES = 64 * 1024
BOUNDARY = "disconnect-boundary"
# About two seconds of generation on the demo model: 200 phrases to find, 64 new tokens for each.
SLOW = {"task": "detection", "phrases": ["a red circle"] * 200, "max_new_tokens": "64", "no_repeat_ngram_size": "0"}
QUICK = {"max_new_tokens": "8"}
QUEUED_CLIENTS = 4
QUEUED_CLIENT_TIMEOUT_S = 0.3


@pytest.fixture(scope="module")
def service(service_factory):
    with service_factory(ENV) as service:
        yield service


def metric(metrics: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def open_sockets(service: Service) -> int:
    """Sockets the service process holds open (its listening socket included)."""
    fd_dir = f"/proc/{service.pid}/fd"
    count = 0
    for name in os.listdir(fd_dir):
        try:
            count += os.readlink(f"{fd_dir}/{name}").startswith("socket:")
        except FileNotFoundError:  # closed while we looked
            pass
    return count


def upload_head(path: str, port: int) -> bytes:
    """Request line and headers announcing DECLARED_BYTES of body, then the start of the body itself."""
    field = "content" if path == "/predict" else "image"
    if path == "/v1/generate":
        content_type, body_start = "application/json", b'{"image": "' + base64.b64encode(PNG)
    else:
        content_type = f"multipart/form-data; boundary={BOUNDARY}"
        body_start = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="a.png"\r\n'
                      "Content-Type: image/png\r\n\r\n").encode() + PNG
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {DECLARED_BYTES}\r\n\r\n").encode()
    return head + body_start + b"A" * (SENT_BYTES - len(body_start))


def leave_mid_upload(service: Service, path: str, abort: bool) -> None:
    """Send the headers and part of the body, then close (abort: a TCP reset instead of a clean close)."""
    port = int(service.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(upload_head(path, port))
        time.sleep(0.05)  # let the service start reading the body
        if abort:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def valid_request(service: Service, path: str) -> httpx.Response:
    if path == "/predict":
        return httpx.post(f"{service.url}/predict", files={"content": ("a.png", PNG)}, timeout=60)
    if path == "/v1/generate":
        return httpx.post(f"{service.url}/v1/generate", json={"image": base64.b64encode(PNG).decode(), **QUICK},
                          timeout=60)
    return httpx.post(f"{service.url}/v1/generate/upload", files={"image": ("a.png", PNG)}, data=QUICK, timeout=60)


@pytest.mark.parametrize("abort", [False, True], ids=["closed", "reset"])
@pytest.mark.parametrize("path", ["/predict", "/v1/generate", "/v1/generate/upload"])
def test_a_client_that_leaves_mid_upload_hurts_no_one(service, path, abort):
    """Three clients leave halfway through their bodies; the service closes their sockets, logs no traceback,
    answers /health and then a valid request on the same route."""
    sockets_before = open_sockets(service)
    for _ in range(3):
        leave_mid_upload(service, path, abort)
    assert httpx.get(f"{service.url}/health", timeout=10).status_code == 200
    answer = valid_request(service, path)
    assert answer.status_code == 200, answer.text
    assert_result_body(path, answer.json())
    deadline = time.monotonic() + 10
    while open_sockets(service) > sockets_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_sockets(service) <= sockets_before, "the service kept the sockets of clients that left"
    assert service.process.poll() is None
    assert "Traceback" not in service.log(), service.log()[-3000:]


def test_clients_that_leave_while_queued_are_dropped_and_the_next_request_is_answered(service):
    """While a slow request runs, four clients queue behind it and give up after 0.3 s. Their requests never run
    (the first-token and token counters grow by the slow request and the next one only), and the next request succeeds."""
    before = httpx.get(f"{service.url}/metrics").text
    slow: dict[str, object] = {}

    def run_slow() -> None:
        slow["response"] = httpx.post(f"{service.url}/v1/generate/upload", files={"image": ("a.png", PNG)},
                                      data=SLOW, timeout=60)
        slow["finished"] = time.monotonic()

    def run_queued(outcomes: list) -> None:
        try:
            outcomes.append(httpx.post(f"{service.url}/v1/generate/upload", files={"image": ("b.png", PNG)},
                                       data=QUICK, timeout=QUEUED_CLIENT_TIMEOUT_S))
        except httpx.TimeoutException:
            outcomes.append("timed out")
        outcomes.append(time.monotonic())

    slow_client = threading.Thread(target=run_slow)
    slow_client.start()
    time.sleep(0.3)  # the slow request is running
    queued_outcomes: list[list] = [[] for _ in range(QUEUED_CLIENTS)]
    queued = [threading.Thread(target=run_queued, args=(outcomes,)) for outcomes in queued_outcomes]
    for client in queued:
        client.start()
    for client in [*queued, slow_client]:
        client.join(timeout=90)

    assert slow["response"].status_code == 200, slow["response"].text
    assert all(outcome == "timed out" for outcome, _ in queued_outcomes), queued_outcomes
    assert slow["finished"] > max(left for _, left in queued_outcomes), "the slow request ended before they left"
    time.sleep(0.5)
    after_leaving = httpx.get(f"{service.url}/metrics").text
    assert metric(after_leaving, "kosmos_queue_depth") == 0
    next_answer = valid_request(service, "/v1/generate/upload")
    assert next_answer.status_code == 200, next_answer.text
    after = httpx.get(f"{service.url}/metrics").text
    first_tokens = "kosmos_time_to_first_token_seconds_count"  # one per request that started generating
    ran = metric(after, first_tokens) - metric(before, first_tokens)
    tokens = metric(after, "kosmos_generated_tokens_total") - metric(before, "kosmos_generated_tokens_total")
    assert ran == 2, f"{ran:g} requests ran: the queued requests of clients that had left were not dropped"
    assert tokens == slow["response"].json()["generated_tokens"] + next_answer.json()["generated_tokens"]
    assert "Traceback" not in service.log(), service.log()[-3000:]
