"""The HTTP service over real loopback HTTP: drop-in contract, every task, limits, keys, metrics, concurrency."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import json
import re

import httpx
import pytest
from PIL import Image

from kosmos_serve.asgi import create_app
from kosmos_serve.config import ServerSettings
from kosmos_serve.engine import GenerationParams, Request
from kosmos_serve.tasks import Task, TaskInput, build_prompts

NEW_TOKENS = 16
# Every task of the core as JSON fields, with the TaskInput it stands for.
TASKS = [
    ({"task": "caption"}, TaskInput(Task.CAPTION)),
    ({"task": "detailed_caption"}, TaskInput(Task.DETAILED_CAPTION)),
    ({"task": "phrase_grounding", "phrases": ["a red circle"]}, TaskInput(Task.PHRASE_GROUNDING, phrases=("a red circle",))),
    ({"task": "referring_comprehension", "phrases": ["the blue square"]},
     TaskInput(Task.REFERRING_COMPREHENSION, phrases=("the blue square",))),
    ({"task": "referring_generation", "boxes": [[10, 20, 150, 160]]},
     TaskInput(Task.REFERRING_GENERATION, boxes=((10, 20, 150, 160),))),
    ({"task": "grounded_vqa", "prompt": "What is special about this image?"},
     TaskInput(Task.GROUNDED_VQA, prompt="What is special about this image?")),
    ({"task": "region_vqa", "prompt": "Where is the fire next to?", "phrases": ["the fire"], "boxes": [[5, 5, 120, 90]]},
     TaskInput(Task.REGION_VQA, prompt="Where is the fire next to?", phrases=("the fire",), boxes=((5, 5, 120, 90),))),
    ({"task": "detection", "phrases": ["a circle", "a star"]}, TaskInput(Task.DETECTION, phrases=("a circle", "a star"))),
    ({"task": "raw", "prompt": "An image of", "grounding": False}, TaskInput(Task.RAW, prompt="An image of", grounding=False)),
]


def comparable(body: dict) -> dict:
    """A result without what depends on timing or on the cache's history."""
    return {key: value for key, value in body.items() if key not in ("timings", "image_cached")}


def expected(engine, image, task_input, params=None) -> dict:
    params = params or GenerationParams(max_new_tokens=NEW_TOKENS)
    return comparable(json.loads(json.dumps(engine.run([Request(image, task_input, params)])[0].to_dict())))


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert "Traceback" not in response.text
    return body["error"]


def test_predict_is_the_reference_contract(serve, reference, sample_images, png_bytes):
    image = sample_images[0]
    prompt = "<grounding> An image of"
    raw, text, entities = reference(image, build_prompts(TaskInput(Task.RAW, prompt=prompt, grounding=False),
                                                         *image.size)[0], max_new_tokens=128)
    _, default_text, _ = reference(image, build_prompts(TaskInput(Task.RAW, prompt="<grounding> Describe:",
                                                                            grounding=False), *image.size)[0],
                                             max_new_tokens=128)
    with serve(default_prompt="<grounding> Describe:") as url:
        given = httpx.post(f"{url}/predict", files={"content": ("a.png", png_bytes[0])}, data={"prompt": prompt})
        default = httpx.post(f"{url}/predict", files={"content": ("a.png", png_bytes[0])})
    assert given.status_code == 200
    assert given.json() == {"output": text, "generated_text": raw.split("</image>")[-1],
                            "entities": json.loads(json.dumps(entities)),
                            "scores": given.json()["scores"]}  # the reference's answer, plus `scores` beside it
    assert [len(scores) for scores in given.json()["scores"]] == [len(boxes) for _, _, boxes in entities]
    assert default.json()["output"] == default_text and default.json()["generated_text"].startswith("<grounding> Describe:")


def test_every_task_through_json_and_multipart_equals_the_engine(serve, engine, sample_images, png_bytes):
    image = sample_images[1]
    wanted = [expected(engine, image, task_input) for _, task_input in TASKS]
    encoded = base64.b64encode(png_bytes[1]).decode()
    with serve() as url:
        for (fields, _), want in zip(TASKS, wanted):
            body = {**fields, "max_new_tokens": NEW_TOKENS}
            as_json = httpx.post(f"{url}/v1/generate", json={"image": encoded, **body}, timeout=60)
            form = {key: json.dumps(value) if key == "boxes" else value for key, value in body.items()}
            as_upload = httpx.post(f"{url}/v1/generate/upload", files={"image": ("b.png", png_bytes[1])}, data=form,
                                   timeout=60)
            assert as_json.status_code == 200, as_json.text
            assert comparable(as_json.json()) == want
            assert comparable(as_upload.json()) == want


def test_annotated_image_comes_back_as_png(serve, png_bytes, sample_images):
    with serve() as url:
        body = httpx.post(f"{url}/v1/generate/upload", files={"image": ("a.png", png_bytes[2])},
                          data={"return_image": "true", "max_new_tokens": "4"}).json()
    drawn = Image.open(io.BytesIO(base64.b64decode(body["annotated_image"])))
    assert drawn.format == "PNG" and drawn.size == sample_images[2].size


def test_streaming_sends_text_then_the_same_result(serve, engine, sample_images, png_bytes):
    task_input = TaskInput(Task.DETECTION, phrases=("a circle", "a star"))
    want = expected(engine, sample_images[0], task_input)
    with serve() as url:
        response = httpx.post(f"{url}/v1/generate/upload", files={"image": ("a.png", png_bytes[0])},
                              data={"task": "detection", "phrases": ["a circle", "a star"], "stream": "true",
                                    "max_new_tokens": NEW_TOKENS}, timeout=60)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = re.findall(r"event: (\w+)\ndata: (.*)\n", response.text)
    names = [name for name, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"text"} and len(names) > 2
    streamed = "".join(json.loads(data)["text"] for name, data in events[:-1])
    result = json.loads(events[-1][1])
    assert comparable(result) == want
    assert streamed.replace("\n", "") == "".join(
        row.split("</phrase>", 1)[1] for row in result["raw_text"].split("\n")
    )


CONCURRENT_CASES = [
    (0, TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=NEW_TOKENS)),
    (1, TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=NEW_TOKENS)),
    (2, TaskInput(Task.PHRASE_GROUNDING, phrases=("a red circle",)), GenerationParams(max_new_tokens=NEW_TOKENS)),
    (0, TaskInput(Task.GROUNDED_VQA, prompt="What is it?"), GenerationParams(max_new_tokens=NEW_TOKENS)),
    (1, TaskInput(Task.DETECTION, phrases=("a circle", "two stars")), GenerationParams(max_new_tokens=NEW_TOKENS)),
    (2, TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=NEW_TOKENS, num_beams=2)),
    (0, TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=NEW_TOKENS, do_sample=True, seed=7)),
    (1, TaskInput(Task.REFERRING_GENERATION, boxes=((10, 20, 150, 160),)), GenerationParams(max_new_tokens=8)),
    (2, TaskInput(Task.DETAILED_CAPTION), GenerationParams(max_new_tokens=NEW_TOKENS)),
    (0, TaskInput(Task.RAW, prompt="An image of", grounding=False), GenerationParams(max_new_tokens=NEW_TOKENS)),
    (1, TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=NEW_TOKENS, do_sample=True, seed=3, top_p=0.5)),
    (2, TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=NEW_TOKENS)),
]


def test_concurrent_mixed_requests_each_get_their_own_answer(serve, engine, sample_images, png_bytes):
    wanted = [expected(engine, sample_images[index], task_input, params)
              for index, task_input, params in CONCURRENT_CASES]

    def send(url, case):
        index, task_input, params = case
        body = {"image": base64.b64encode(png_bytes[index]).decode(), "task": task_input.task.value,
                "prompt": task_input.prompt, "phrases": list(task_input.phrases),
                "boxes": [list(box) for box in task_input.boxes], "grounding": task_input.grounding,
                **{key: value for key, value in dataclasses.asdict(params).items() if value is not None}}
        return httpx.post(f"{url}/v1/generate", json=body, timeout=120)

    with serve(max_batch_requests=4, batch_timeout_ms=200) as url:
        with concurrent.futures.ThreadPoolExecutor(len(CONCURRENT_CASES)) as pool:
            responses = list(pool.map(lambda case: send(url, case), CONCURRENT_CASES))
        metrics = httpx.get(f"{url}/metrics").text
    assert [comparable(response.json()) for response in responses] == wanted
    steps = float(re.search(r"^kosmos_batch_size_count (\S+)", metrics, re.MULTILINE).group(1))
    alone = float(re.search(r'^kosmos_batch_size_bucket\{le="1.0"\} (\S+)', metrics, re.MULTILINE).group(1))
    assert alone < steps  # at some decode steps several requests really shared the batch


BAD_REQUESTS = [
    ({"image": ("x.png", b"this is not an image")}, {}, 400, "invalid_image"),
    ({"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)}, {}, 400, "invalid_image"),
    (None, {"task": "caption"}, 422, "invalid_request"),  # no image at all
    ("image", {"task": "teleport"}, 422, "invalid_request"),
    ("image", {"task": "referring_generation", "boxes": "[[50, 50, 10, 10]]"}, 422, "invalid_box"),
    ("image", {"task": "referring_generation", "boxes": "[[0, 0, 9000, 10]]"}, 422, "invalid_box"),
    ("image", {"task": "referring_generation", "boxes": "not json"}, 422, "invalid_request"),
    ("image", {"max_new_tokens": "5000"}, 422, "invalid_request"),
    ("image", {"no_repeat_ngram_size": "-1"}, 422, "invalid_request"),
    ("image", {"temperature": "0"}, 422, "invalid_request"),
    ("image", {"task": "grounded_vqa", "prompt": "why? " * 1000}, 422, "invalid_request"),
    ("image", {"unknown_field": "1"}, 422, "invalid_request"),
    ("image", {"min_score": "1.5"}, 422, "invalid_request"),
    ("image", {"min_score": "high"}, 422, "invalid_request"),
]


def test_bad_requests_get_a_clear_error_and_the_service_goes_on(serve, png_bytes):
    with serve() as url:
        for files, data, status, code in BAD_REQUESTS:
            files = {"image": ("a.png", png_bytes[0])} if files == "image" else files
            response = httpx.post(f"{url}/v1/generate/upload", files=files, data=data)
            assert response.status_code == status, (data, response.text)
            assert error_of(response)["code"] == code
        url_image = httpx.post(f"{url}/v1/generate", json={"image": "https://example.com/cat.png"})
        assert url_image.status_code == 400 and "fetches no image from example.com" in error_of(url_image)["message"]
        assert httpx.post(f"{url}/v1/generate/upload", files={"image": ("a.png", png_bytes[0])},
                          data={"max_new_tokens": "2"}).status_code == 200
        assert error_of(httpx.get(f"{url}/nowhere"))["code"] == "not_found"


# (route, fields, the field named first in the message, words the message holds): no CLI flag anywhere
FIELD_ERRORS = [
    ("/v1/generate", {"task": "phrase_grounding"}, "phrases", "needs exactly one phrase; got 0"),
    ("/v1/generate", {"task": "detection"}, "phrases", "at least one phrase"),
    ("/v1/generate", {"task": "referring_generation"}, "boxes", "at least one box"),
    ("/v1/generate", {"task": "referring_generation", "boxes": [[0, 0, 9000, 10]]}, "boxes", "lies outside"),
    ("/v1/generate", {"task": "grounded_vqa"}, "prompt", "needs a question"),
    ("/v1/generate", {"task": "raw", "prompt": " "}, "prompt", "needs a prompt"),
    ("/v1/generate", {"min_score": 2}, "min_score", "less than or equal to 1"),
    ("/v1/generate", {"max_new_tokens": 2000}, "max_new_tokens", "KOSMOS_MAX_NEW_TOKENS_CAP"),
    ("/v1/generate/upload", {"task": "detection"}, "phrases", "at least one phrase"),
    ("/predict", {"prompt": "Why? " * 500}, "prompt", "KOSMOS_MAX_PROMPT_CHARS"),
]


def test_an_input_at_fault_is_named_by_its_json_or_form_field(serve, png_bytes):
    image = base64.b64encode(png_bytes[0]).decode()
    with serve() as url:
        for route, fields, field, words in FIELD_ERRORS:
            if route == "/v1/generate":
                response = httpx.post(f"{url}{route}", json={"image": image, **fields})
            else:
                upload = {"content" if route == "/predict" else "image": ("a.png", png_bytes[0])}
                response = httpx.post(f"{url}{route}", files=upload, data=fields)
            message = error_of(response)["message"]
            assert response.status_code == 422 and message.startswith(f"{field}: "), (fields, message)
            assert words in message and "--" not in message, (fields, message)


def test_the_task_list_names_json_fields_not_cli_flags(serve):
    with serve() as url:
        tasks = {task["name"]: task for task in httpx.get(f"{url}/v1/tasks").json()["tasks"]}
    assert tasks["region_vqa"]["inputs"] == ["prompt", "phrases", "boxes"] and tasks["caption"]["inputs"] == []
    assert not [task for task in tasks.values() if "--" in task["description"]]


def test_upload_and_pixel_caps_answer_413(engine, serve_app, png_bytes):
    huge = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(huge, format="PNG")  # 400 megapixels in a small file
    cap = len(huge.getvalue()) + 1000
    app = create_app(ServerSettings(max_upload_bytes=cap), engine.settings, engine=engine)
    with serve_app(app) as url:
        big_body = httpx.post(f"{url}/predict", files={"content": ("a.png", b"\0" * (cap + 5000))})
        bomb = httpx.post(f"{url}/predict", files={"content": ("bomb.png", huge.getvalue())})
    assert big_body.status_code == 413 and error_of(big_body)["code"] == "payload_too_large"
    assert bomb.status_code == 413 and error_of(bomb)["code"] == "image_too_large"


def test_full_queue_is_503_with_retry_after_and_slow_requests_504(serve, png_bytes):
    def caption(url):
        return httpx.post(f"{url}/v1/generate/upload", files={"image": ("a.png", png_bytes[0])},
                          data={"max_new_tokens": "64"}, timeout=60)

    with serve(max_queue=1, max_batch_requests=1, batch_timeout_ms=0) as url, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: caption(url), range(8)))
    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) == {200, 503}
    busy = next(response for response in responses if response.status_code == 503)
    assert busy.headers["Retry-After"].isdigit() and error_of(busy)["code"] == "service_busy"
    with serve(request_timeout_s=0.001) as url:
        late = caption(url)
    assert late.status_code == 504 and error_of(late)["code"] == "timeout"


def test_a_client_that_leaves_hurts_no_one(serve, png_bytes):
    with serve() as url:
        for stream in ("false", "true"):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{url}/v1/generate/upload", files={"image": ("a.png", png_bytes[0])},
                           data={"max_new_tokens": "512", "stream": stream}, timeout=0.05)
        after = httpx.post(f"{url}/v1/generate/upload", files={"image": ("a.png", png_bytes[1])},
                           data={"max_new_tokens": "4"}, timeout=60)
    assert after.status_code == 200 and after.json()["generated_tokens"] > 0


def test_api_key_guards_every_route_but_health(serve, png_bytes):
    with serve(api_key="s3cret") as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 200
        for path in ("/info", "/metrics", "/v1/tasks"):
            response = httpx.get(f"{url}{path}")
            assert response.status_code == 401 and error_of(response)["code"] == "unauthorized"
        assert httpx.post(f"{url}/predict", files={"content": ("a.png", png_bytes[0])}).status_code == 401
        assert httpx.get(f"{url}/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/info", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_metrics_move_and_a_second_question_skips_the_vision_encoder(serve, png_bytes):
    def count(metrics, name):
        found = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    fresh = Image.effect_noise((123, 77), 40).convert("RGB")
    buffer = io.BytesIO()
    fresh.save(buffer, format="PNG")
    with serve() as url:
        first = httpx.post(f"{url}/v1/generate/upload", files={"image": ("n.png", buffer.getvalue())},
                           data={"max_new_tokens": "4"}).json()
        second = httpx.post(f"{url}/v1/generate/upload", files={"image": ("n.png", buffer.getvalue())},
                            data={"task": "grounded_vqa", "prompt": "What is it?", "max_new_tokens": "4"}).json()
        metrics = httpx.get(f"{url}/metrics").text
    assert first["image_cached"] is False and second["image_cached"] is True
    assert second["timings"]["vision_seconds"] == 0.0
    assert count(metrics, 'kosmos_image_features_total{source="cache"}') == 1
    assert count(metrics, 'kosmos_image_features_total{source="encoder"}') == 1
    assert count(metrics, 'kosmos_requests_total{route="/v1/generate/upload",status="200"}') == 2
    assert count(metrics, "kosmos_generated_tokens_total") == first["generated_tokens"] + second["generated_tokens"]
    assert count(metrics, 'kosmos_request_seconds_count{route="/v1/generate/upload"}') == 2
    assert "kosmos_queue_depth 0.0" in metrics


def test_metrics_count_every_route_under_its_template_and_any_other_path_as_unmatched(serve):
    counted_as = {  # (method, path) asked -> the route it is counted under
        ("GET", "/docs"): "/docs", ("GET", "/redoc"): "/redoc", ("GET", "/openapi.json"): "/openapi.json",
        ("GET", "/docs/oauth2-redirect"): "/docs/oauth2-redirect",
        ("GET", "/docs/static/swagger-ui.css"): "/docs/static/{path}",
        ("GET", "/v1/models/some/model"): "/v1/models/{model:path}",
        ("GET", "/v1/generate"): "/v1/generate",  # 405: a known route, another method
        ("POST", "/v1/chat/completions"): "/v1/chat/completions",
        ("GET", "/label-studio/health"): "/label-studio/health",
        ("GET", "/supervisely/no-such-endpoint"): "/supervisely/{endpoint:path}",
        ("GET", "/no/such/page-31337"): "unmatched",
        ("GET", "/health/"): "unmatched",  # answered by a redirect to /health, which no route serves as such
    }
    with serve() as url:
        for method, path in counted_as:
            httpx.request(method, f"{url}{path}", json={} if method == "POST" else None)
        metrics = httpx.get(f"{url}/metrics").text
    counted = re.findall(r'^kosmos_requests_total\{route="([^"]+)",status="(\d+)"\} (\S+)$', metrics, re.MULTILINE)
    assert {route for route, _, _ in counted} == {*counted_as.values(), "/ready"}  # /ready: waiting for the model
    assert sorted((status, value) for route, status, value in counted if route == "unmatched") == [
        ("307", "1.0"), ("404", "1.0")]


def test_info_health_and_request_ids(serve, engine):
    with serve() as url:
        info = httpx.get(f"{url}/info").json()
        echoed = httpx.get(f"{url}/health", headers={"X-Request-ID": "abc123"})
        generated = httpx.get(f"{url}/health")
    assert info["model"] == engine.settings.model and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["ready"] is True and info["limits"]["max_new_tokens_cap"] == engine.settings.max_new_tokens_cap
    assert info["family"] == "Kosmos-2" and info["tasks"] == [task.value for task in engine.family.tasks]
    assert "ocr" not in info["tasks"]
    assert set(info["tasks"]) | {"ocr", "markdown", "question"} == {task.value for task in Task}
    assert echoed.headers["X-Request-ID"] == "abc123" and len(generated.headers["X-Request-ID"]) == 16


def test_a_model_that_cannot_load_is_503_but_the_process_lives(serve_app, tmp_path, png_bytes):
    from kosmos_serve.config import EngineSettings

    app = create_app(ServerSettings(), EngineSettings(model=str(tmp_path / "missing"), device="cpu"))
    with serve_app(app, ready=False) as url:
        for _ in range(100):
            ready = httpx.get(f"{url}/ready")
            if ready.json()["error"]["code"] == "model_unavailable":
                break
        predict = httpx.post(f"{url}/predict", files={"content": ("a.png", png_bytes[0])})
        health = httpx.get(f"{url}/health")
    assert ready.status_code == 503 and error_of(ready)["code"] == "model_unavailable"
    assert predict.status_code == 503 and health.status_code == 200


def test_openapi_documents_every_route_with_an_example(engine):
    spec = create_app(ServerSettings(demo=False), engine.settings, engine=engine).openapi()
    assert {"/predict", "/v1/generate", "/v1/generate/upload", "/v1/tasks", "/health", "/ready", "/info",
            "/metrics"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert schemas["GenerateJSON"]["examples"] and schemas["GenerateResponse"]["examples"]
    assert schemas["PredictResponse"]["examples"][0]["entities"][0][0] == "a snowman"
    for route in ("/predict", "/v1/generate/upload"):
        assert "curl" in spec["paths"][route]["post"]["description"]
        assert set(spec["paths"][route]["post"]["responses"]) >= {"200", "400", "413", "422", "503", "504"}
