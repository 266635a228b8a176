"""The HTTP service on a Kosmos-2.5: `/v1/generate` reads pages (ocr, markdown) as the engine does; `/info` and
`/v1/tasks` name the model's tasks; Kosmos-2's tasks are a clear 422."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from local_server import serve_in_thread

from kosmos_serve.asgi import create_app
from kosmos_serve.config import ServerSettings
from kosmos_serve.engine import GenerationParams, Request
from kosmos_serve.tasks import Task, TaskInput

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def kosmos25_url(kosmos25_engine):
    """The service on the tiny Kosmos-2.5's engine; yields its base URL."""
    app = create_app(ServerSettings(demo=False), kosmos25_engine.settings, engine=kosmos25_engine)
    with serve_in_thread(app) as url:
        yield url


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def comparable(body: dict) -> dict:
    """A result without what depends on timing or on the cache's history."""
    return {key: value for key, value in body.items() if key not in ("timings", "image_cached")}


def test_ocr_and_markdown_through_json_and_upload_equal_the_engine(kosmos25_engine, kosmos25_url, sample_images):
    image, page = sample_images[1], png(sample_images[1])
    for task in (Task.OCR, Task.MARKDOWN):
        result = kosmos25_engine.run([Request(image, TaskInput(task), GenerationParams(max_new_tokens=NEW_TOKENS))])
        want = comparable(json.loads(json.dumps(result[0].to_dict())))
        fields = {"task": task.value, "max_new_tokens": NEW_TOKENS}
        as_json = httpx.post(f"{kosmos25_url}/v1/generate", json={"image": base64.b64encode(page).decode(), **fields},
                             timeout=60)
        as_upload = httpx.post(f"{kosmos25_url}/v1/generate/upload", files={"image": ("page.png", page)}, data=fields,
                               timeout=60)
        assert as_json.status_code == 200, as_json.text
        assert comparable(as_json.json()) == comparable(as_upload.json()) == want
        assert ("lines" in want) is (task is Task.OCR)


def test_kosmos_2_tasks_are_a_422_naming_the_models_tasks(kosmos25_url, sample_images):
    image = base64.b64encode(png(sample_images[0])).decode()
    response = httpx.post(f"{kosmos25_url}/v1/generate", json={"image": image, "task": "caption"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("task: Task 'caption' is not one of this model's")
    assert "is a Kosmos-2.5 model, whose tasks are ocr, markdown" in error["message"]


def test_info_and_the_task_list_follow_the_model(kosmos25_url):
    info = httpx.get(f"{kosmos25_url}/info").json()
    tasks = httpx.get(f"{kosmos25_url}/v1/tasks").json()["tasks"]
    assert info["family"] == "Kosmos-2.5" and info["tasks"] == ["ocr", "markdown"]
    assert info["defaults"]["max_new_tokens"] == 1024 and info["defaults"]["no_repeat_ngram_size"] == 0
    assert [task["name"] for task in tasks] == ["ocr", "markdown"] and all(task["inputs"] == [] for task in tasks)


def test_the_reference_predict_route_points_to_v1_generate(kosmos25_url, sample_images):
    response = httpx.post(f"{kosmos25_url}/predict", files={"content": ("page.png", png(sample_images[1]))},
                          data={"prompt": "<ocr>"}, timeout=60)
    assert response.status_code == 422
    assert response.json()["error"] == {"code": "invalid_request", "message": (
        "POST /predict is the reference Kosmos-2 service's route (an image and a prompt, grounded text back); this "
        "service runs a Kosmos-2.5 model, which takes no prompt of its own. Send the image to POST /v1/generate (or "
        "/v1/generate/upload) with task 'ocr' or 'markdown'.")}


def test_return_image_draws_each_line_read(kosmos25_url, sample_images, monkeypatch):
    """A random model writes no lines: the engine's parser is handed a written reading (the production parser's)."""
    from PIL import Image

    from kosmos_serve.engine.families import Kosmos25Family
    from kosmos_serve.ocr import parse_reading, resized_size

    page = Image.new("RGB", (400, 200), "white")
    resized_width, resized_height = resized_size(*page.size)
    reading = (f"<ocr><bbox><x_40><y_40><x_{resized_width // 2}><y_{resized_height // 4}></bbox>RECEIPT\n"
               f"<bbox><x_40><y_{resized_height // 2}><x_{resized_width - 40}><y_{resized_height - 60}></bbox>TOTAL\n")
    monkeypatch.setattr(Kosmos25Family, "parse",
                        lambda self, processor, decoded, spec, size: parse_reading(reading, spec.text, *size))
    response = httpx.post(f"{kosmos25_url}/v1/generate", timeout=60, json={
        "image": base64.b64encode(png(page)).decode(), "task": "ocr", "max_new_tokens": 2, "return_image": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [line["text"] for line in body["lines"]] == ["RECEIPT", "TOTAL"]
    drawn = Image.open(io.BytesIO(base64.b64decode(body["annotated_image"]))).convert("RGB")
    assert drawn.size == page.size
    for line in body["lines"]:
        x1, y1, x2, y2 = line["box"]
        assert drawn.getpixel((x1, y1)) != (255, 255, 255)  # its outline
        inside = drawn.crop((x1 + 3, y1 + 3, x2 - 2, y2 - 2)).convert("L")
        assert inside.getextrema()[0] < 100  # its text, in black
    assert drawn.getpixel((5, 5)) == drawn.getpixel((395, 195)) == (255, 255, 255)  # nowhere else
