"""Requests at the edges: ranges declared in the schema, bodies over the limit, clients that leave, batching order."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import threading
import time
from importlib.resources import files

import httpx
import pytest

from kosmos_serve.asgi import create_app
from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.generation import SEED_LIMIT


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]



SAMPLING_BEYOND_RANGE = [
    ({"do_sample": True, "temperature": float("inf")}, "temperature: Input should be a finite number"),
    ({"do_sample": True, "temperature": 1e-300}, "temperature: Input should be greater than or equal to 0.01"),
    ({"do_sample": True, "seed": SEED_LIMIT + 1}, "seed: Input should be less than or equal to"),
    ({"do_sample": True, "top_p": 0}, "top_p: Input should be greater than 0"),
    ({"num_beams": 9}, "num_beams: Input should be less than or equal to 8"),
]


@pytest.mark.parametrize("fields, message", SAMPLING_BEYOND_RANGE)
def test_sampling_parameters_that_would_fail_are_refused_with_422(serve, png_bytes, fields, message):
    as_form = {key: "inf" if value == float("inf") else str(value).lower() for key, value in fields.items()}
    with serve() as url:
        body = {"image": base64.b64encode(png_bytes[0]).decode(), "max_new_tokens": 2, **fields}
        json_answer = httpx.post(f"{url}/v1/generate", content=json.dumps(body),  # Infinity as clients write it
                                 headers={"Content-Type": "application/json"})
        form_answer = httpx.post(f"{url}/v1/generate/upload", files={"image": ("a.png", png_bytes[0])},
                                 data={"max_new_tokens": "2", **as_form})
    for answer in (json_answer, form_answer):
        assert answer.status_code == 422, answer.text
        assert error_of(answer)["code"] == "invalid_request" and message in error_of(answer)["message"]


def test_every_numeric_field_declares_its_range_in_openapi(engine):
    settings = engine.settings.model_copy(update={"max_new_tokens_cap": 64})
    spec = create_app(ServerSettings(demo=False), settings, engine=engine).openapi()
    for name in ("GenerateJSON", "GenerateForm"):
        fields = spec["components"]["schemas"][name]["properties"]
        declared = {}
        for field, schema in fields.items():
            for option in [schema, *schema.get("anyOf", [])]:
                if option.get("type") in ("integer", "number"):
                    declared[field] = (option.get("minimum", option.get("exclusiveMinimum")), option.get("maximum"))
        assert declared == {
            "max_new_tokens": (1, 64),  # the configured cap, not only the model's context
            "temperature": (0.01, 100.0),
            "top_p": (0.0, 1.0),
            "num_beams": (1, 8),
            "seed": (0, SEED_LIMIT),
            "no_repeat_ngram_size": (0, 64),
            "min_score": (0.0, 1.0),
            "nms_iou": (0.0, 1.0),
        }, name


@pytest.mark.parametrize("send", ["text field", "url-encoded form"])
def test_predict_says_content_must_be_a_file(serve, send):
    with serve() as url:
        if send == "text field":
            answer = httpx.post(f"{url}/predict", data={"content": "not a file"}, files={"other": ("x", b"1")})
        else:
            answer = httpx.post(f"{url}/predict", data={"content": "not a file"})
    assert answer.status_code == 422
    message = error_of(answer)["message"]
    assert message.startswith("content: must be a file") and "<class" not in message and "UploadFile" not in message


def test_a_chunked_body_over_the_upload_limit_is_413(engine, serve_app, png_bytes):
    cap = 300_000  # the small valid upload below is about 190 kB

    def chunks():
        for _ in range(40):
            yield b"\0" * 10_000

    app = create_app(ServerSettings(demo=False, max_upload_bytes=cap), engine.settings, engine=engine)
    boundary = "kosmosboundary"
    multipart_head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"content\"; filename=\"a.png\"\r\n"
                      "Content-Type: image/png\r\n\r\n").encode()

    def multipart_chunks():
        yield multipart_head
        yield from chunks()

    with serve_app(app) as url:
        as_json = httpx.post(f"{url}/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
        as_upload = httpx.post(f"{url}/predict", content=multipart_chunks(),
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        small = httpx.post(f"{url}/predict", files={"content": ("a.png", png_bytes[2])}, timeout=60)
    for answer in (as_json, as_upload):
        assert answer.request.headers["transfer-encoding"] == "chunked"
        assert answer.status_code == 413 and error_of(answer)["code"] == "payload_too_large"
    assert small.status_code == 200


def _gate_engine(monkeypatch):
    """Make the engine hold its first admission until `gate` is set; `calls` records every request admitted.

    Admission (`Scheduler.add`) is the engine's unit of work: a request that never reaches it never runs.
    """
    from kosmos_serve.engine.scheduler import Scheduler

    gate, calls = threading.Event(), []
    add = Scheduler.add

    def gated(self, request, *args, **kwargs):
        calls.append("stream" if kwargs.get("on_tokens") else "run")
        gate.wait(30)
        return add(self, request, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "add", gated)
    return gate, calls


def test_a_request_whose_client_left_while_queued_is_never_run(serve, engine, png_bytes, monkeypatch):
    def caption(url, timeout, stream="false"):
        return httpx.post(f"{url}/v1/generate/upload", files={"image": ("a.png", png_bytes[0])},
                          data={"max_new_tokens": "4", "stream": stream}, timeout=timeout)

    with serve(max_batch_requests=1, batch_timeout_ms=0) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
        gate, calls = _gate_engine(monkeypatch)
        first = pool.submit(caption, url, 60)
        while not calls:
            time.sleep(0.01)
        for stream in ("false", "true"):  # queued behind the first, then gone
            with pytest.raises(httpx.TimeoutException):
                caption(url, 0.3, stream)
        time.sleep(0.3)  # the service sees both connections close
        gate.set()
        assert first.result().status_code == 200
        after = caption(url, 60)
    assert after.status_code == 200
    assert calls == ["run", "run"]  # the first and the last; the two that left never reached the engine


def test_a_streamed_request_behind_one_waiting_for_company_is_served(serve, png_bytes):
    """A plain request waits for company; a streamed one arriving meanwhile must not wait for a third."""
    def caption(url, stream):
        return httpx.post(f"{url}/v1/generate/upload", files={"image": ("a.png", png_bytes[1])},
                          data={"max_new_tokens": "4", "stream": stream}, timeout=20)

    with serve(max_batch_requests=4, batch_timeout_ms=500) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
        plain = pool.submit(caption, url, "false")
        time.sleep(0.1)
        streamed = pool.submit(caption, url, "true")
        assert plain.result().status_code == 200
        answer = streamed.result()
    assert answer.status_code == 200 and "event: result" in answer.text


def test_the_demo_models_own_defaults_give_its_grounded_caption_on_predict(serve_app):
    from kosmos_serve.demo import EXAMPLES_DIR

    app = create_app(ServerSettings(demo=False), EngineSettings(model="demo"))
    with serve_app(app) as url:
        answer = httpx.post(f"{url}/predict", files={"content": ("s.png", (EXAMPLES_DIR / "scene-four-shapes.png")
                                                                  .read_bytes())}, timeout=60).json()
        info = httpx.get(f"{url}/info").json()
    demo_defaults = json.loads((files("kosmos_serve") / "models" / "demo" / "kosmos_serve.json").read_text())
    assert info["defaults"] == {"default_prompt": "<grounding> An image of", "max_new_tokens": 64,
                                "no_repeat_ngram_size": 0, "min_score": demo_defaults["min_score"],
                                "nms_iou": demo_defaults["nms_iou"]}
    assert answer["output"].startswith("An image of a ") and len(answer["entities"]) >= 3
