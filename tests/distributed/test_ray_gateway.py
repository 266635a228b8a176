"""The gateway alone, against stand-in replicas: a replica that dies mid-answer costs the client nothing."""

import asyncio

from ray.exceptions import RayActorError
from starlette.requests import Request

from kosmos_serve.distributed.ray_serve import Gateway

BODY = b'{"answer": "a red circle"}'
JSON_START = {"type": "http.response.start", "status": 200,
              "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]}
SSE_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


class Replicas:
    """A deployment handle whose replicas answer with `scripts`, one per attempt: messages, or an exception to raise."""

    def __init__(self, *scripts):
        self.scripts = list(scripts)
        self.forward = self
        self.attempts = 0

    def options(self, **_):
        return self

    def remote(self, forwarded):
        script = self.scripts[self.attempts]
        self.attempts += 1

        async def answer():
            for step in script:
                if isinstance(step, Exception):
                    raise step
                yield step
        return answer()


def request() -> Request:
    async def receive():
        return {"type": "http.request", "body": b'{"image": "abc"}', "more_body": False}
    scope = {"type": "http", "method": "POST", "path": "/v1/generate", "headers": [], "query_string": b""}
    return Request(scope, receive)


async def send_through(gateway: Gateway) -> tuple[int, bytes]:
    response = await gateway(request())
    chunks = []

    async def send(message):
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    async def connected():  # the client stays until the answer ends
        await asyncio.Event().wait()

    await response({"type": "http"}, connected, send)
    return response.status_code, b"".join(chunks)


def body(content: bytes) -> dict:
    return {"type": "http.response.body", "body": content, "more_body": False}


def test_a_replica_that_dies_between_its_headers_and_its_body_is_retried_whole():
    replicas = Replicas([JSON_START, RayActorError()], [JSON_START, body(BODY)])
    assert asyncio.run(send_through(Gateway(replicas))) == (200, BODY)
    assert replicas.attempts == 2


def test_three_deaths_answer_503_with_retry_after():
    replicas = Replicas(*[[JSON_START, RayActorError()]] * 3)
    gateway = Gateway(replicas)
    response = asyncio.run(gateway(request()))
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert b"service_busy" in response.body and replicas.attempts == 3


def test_a_stream_is_passed_on_as_it_comes():
    events = [b"event: text\ndata: a red\n\n", b"event: text\ndata:  circle\n\n"]
    first = {"type": "http.response.body", "body": events[0], "more_body": True}
    replicas = Replicas([SSE_START, first, body(events[1])])
    assert asyncio.run(send_through(Gateway(replicas))) == (200, b"".join(events))
