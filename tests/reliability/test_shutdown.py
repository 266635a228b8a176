"""SIGTERM with requests in flight: every client gets its answer, and the process exits within a bounded time."""

from __future__ import annotations

import base64
import signal
import threading
import time

import httpx

from . import bad_images
from .support import assert_error_shape, assert_result_body

ENV = {"MAX_BATCH_SIZE": "1", "KOSMOS_BATCH_TIMEOUT_MS": "0"}  # one request at a time: the rest wait in the queue
IMAGE = base64.b64encode(bad_images.valid_png()[0]).decode()
# About a second of generation each on the demo model: 100 phrases to find, 64 new tokens for each.
SLOW = {"task": "detection", "phrases": ["a red circle"] * 100, "max_new_tokens": 64, "no_repeat_ngram_size": 0}
QUICK = {"task": "caption", "max_new_tokens": 8}
REQUESTS = [SLOW, QUICK, SLOW, QUICK, SLOW, QUICK]
CLIENT_TIMEOUT_S = 60  # a client never waits longer than this: a hung request fails the test instead of hanging it
EXIT_WITHIN_S = 30


def test_sigterm_answers_every_request_in_flight_and_the_process_exits(service_factory):
    """Six requests (three slow) queued and running; SIGTERM: each gets 200 or a 503 error, none hangs or is cut off;
    a request sent after the signal is refused or answered at once; the process exits within EXIT_WITHIN_S."""
    with service_factory(ENV) as service:
        outcomes: dict[int, tuple[httpx.Response | Exception, float]] = {}

        def send(index: int) -> None:
            try:
                outcome = httpx.post(f"{service.url}/v1/generate", json={"image": IMAGE, **REQUESTS[index]},
                                     timeout=CLIENT_TIMEOUT_S)
            except httpx.HTTPError as error:
                outcome = error
            outcomes[index] = (outcome, time.monotonic())

        clients = [threading.Thread(target=send, args=(index,), daemon=True) for index in range(len(REQUESTS))]
        for client in clients:
            client.start()
        time.sleep(0.5)  # every request sent and queued; the first slow one is running
        assert len(outcomes) < len(REQUESTS), "the requests finished before the signal: nothing was in flight"
        signalled = time.monotonic()
        service.process.send_signal(signal.SIGTERM)

        try:
            late = httpx.post(f"{service.url}/v1/generate", json={"image": IMAGE, **QUICK}, timeout=10)
            assert late.status_code in (200, 503), late.text
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the listening socket is closed: refused, as it should be

        for client in clients:
            client.join(timeout=CLIENT_TIMEOUT_S + 5)
        assert not any(client.is_alive() for client in clients), "a client is still waiting"
        return_code = service.process.wait(timeout=EXIT_WITHIN_S)
        exited_after = time.monotonic() - signalled

    log = service.log()
    assert exited_after < EXIT_WITHIN_S
    assert return_code in (0, -signal.SIGTERM), f"exit status {return_code}:\n{log[-2000:]}"
    for index, (outcome, _) in sorted(outcomes.items()):
        assert isinstance(outcome, httpx.Response), f"request {index} got no answer: {outcome!r}"
        if outcome.status_code == 200:
            assert_result_body("/v1/generate", outcome.json())
        else:
            assert outcome.status_code == 503 and assert_error_shape(outcome)["code"] == "service_busy", outcome.text
    assert len(outcomes) == len(REQUESTS)
    assert any(finished > signalled for _, finished in outcomes.values()), "no request was in flight at the signal"
    assert "Application shutdown complete" in log and "Traceback" not in log, log[-3000:]
