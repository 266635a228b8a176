"""Supervisely's served-model protocol under /supervisely: the real `supervisely` SDK as the client, and bad input.

The SDK pins older fastapi, pydantic and pandas than this project, so it lives in its own virtual
environment (tests/tool_environments.py: outside the checkout, created by the first run) and
drives the service from a subprocess. The service runs in this process, on the shipped demo model,
so the boxes the SDK receives are real groundings of examples/scene-four-shapes.png.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from local_server import serve_in_thread

from kosmos_serve.asgi import create_app
from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.engine import Engine
from kosmos_serve.server.supervisely.protocol import NEEDS_PLATFORM, rectangle_object

REPO = Path(__file__).resolve().parents[2]
SCENE = REPO / "examples" / "scene-four-shapes.png"
OTHER_SCENE = REPO / "examples" / "scene-three-shapes.png"
DEFAULT_PROMPT = "<grounding> An image of"

# Runs in the SDK's environment: argv = session URL, image path. Prints one line `RESULT {json}`.
CLIENT = r"""
import json, sys
import supervisely as sly
from requests import HTTPError

url, image = sys.argv[1], sys.argv[2]
api = sly.Api("http://localhost", "no-platform")
session = sly.nn.inference.SessionJSON(api, session_url=url, inference_settings={"max_new_tokens": 32})
out = {
    "info": session.get_session_info(),
    "defaults": session.get_default_inference_settings(),
    "meta": session.get_model_meta(),
    "one": session.inference_image_path(image),
    "many": session.inference_image_paths([image, image]),
}
typed = sly.nn.inference.Session(api, session_url=url, inference_settings={"max_new_tokens": 32})
annotation = typed.inference_image_path(image)
out["labels"] = [[label.obj_class.name, label.geometry.geometry_name(), label.geometry.left, label.geometry.top,
                  label.geometry.right, label.geometry.bottom, label.tags.get("confidence").value,
                  label.tags.get("confidence").meta.value_type] for label in annotation.labels]
from supervisely.nn.model.prediction import Prediction
out["scores"] = [float(s) for s in Prediction(out["one"]["annotation"], model_meta=typed.get_model_meta()).scores]
errors = {}
try:
    session.inference_image_id(1)
except HTTPError as error:
    errors["platform"] = [error.response.status_code, error.response.json()]
session.update_inference_settings(max_new_tokens=0)
try:
    session.inference_image_path(image)
except HTTPError as error:
    errors["settings"] = [error.response.status_code, error.response.json()]
out["errors"] = errors
print("RESULT " + json.dumps(out))
"""


# ------------------------------------------------------------------------------------------------ fixtures



@pytest.fixture(scope="module")
def demo_engine():
    """The shipped demo model: it really grounds the example scenes."""
    return Engine(EngineSettings(model="demo", device="cpu"))


@pytest.fixture(scope="module")
def service(demo_engine):
    """The whole service on the demo model; yields its base URL."""
    app = create_app(ServerSettings(demo=False), demo_engine.settings, engine=demo_engine)
    with serve_in_thread(app) as base_url:
        yield base_url


def run_sdk(python: str, session_url: str, image: Path) -> dict:
    """The CLIENT script in the SDK's environment; its RESULT line, parsed."""
    done = subprocess.run([python, "-c", CLIENT, session_url, str(image)], check=False, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"the SDK client failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def grounded_boxes(base_url: str, image: Path, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 32) -> dict:
    """The same generation through the /v1 API: the answer the Supervisely routes must turn into objects."""
    body = {"image": base64.b64encode(image.read_bytes()).decode(), "task": "raw", "prompt": prompt,
            "max_new_tokens": max_new_tokens}
    response = httpx.post(f"{base_url}/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def objects_of(answer: dict, min_score: float = 0.0) -> list:
    """The objects a /v1 answer's boxes make, [phrase, exterior, score], those scored under `min_score` left out."""
    return [[entity["phrase"], [[x1, y1], [x2, y2]], score] for entity in answer["entities"]
            for (x1, y1, x2, y2), score in zip(entity["pixel_boxes"], entity["scores"], strict=True)
            if score >= min_score]


def default_min_score(base_url: str) -> float:
    return httpx.get(f"{base_url}/info").json()["defaults"]["min_score"]


def exterior_and_score(objects: list[dict]) -> list:
    """Supervisely objects as [class, exterior, confidence]."""
    return [[o["classTitle"], o["points"]["exterior"], *[t["value"] for t in o["tags"] if t["name"] == "confidence"]]
            for o in objects]


def assert_supervisely_error(response: httpx.Response, status: int, *fragments: str) -> None:
    """The error shape of Supervisely's own servers (Inference.serve's handler), with a message naming the problem."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"detail", "success", "message"}, body
    assert body["success"] is False and body["detail"] == body["message"]
    for fragment in fragments:
        assert fragment in body["message"], body["message"]


def upload(*files: tuple[str, bytes], settings: dict | str | None = None) -> dict:
    """Multipart as SessionJSON sends it: `files` parts and a `settings` text part holding the state."""
    parts = [("files", (name, data)) for name, data in files]
    if settings is not None:
        text = settings if isinstance(settings, str) else json.dumps(settings)
        parts.append(("settings", (None, text, "text/plain")))
    return {"files": parts}


# ------------------------------------------------------------------------------------------------ the real SDK


def test_the_supervisely_sdk_runs_inference_through_session_json(service, supervisely_python):
    threshold = default_min_score(service)
    expected = objects_of(grounded_boxes(service, SCENE), threshold)
    assert len(expected) >= 3, expected  # the demo model grounds the scene's shapes

    got = run_sdk(supervisely_python, f"{service}/supervisely", SCENE)

    assert got["info"]["task type"] == "prompt-based object detection"
    assert got["info"]["batch_inference_support"] is True
    # the demo model's defaults
    assert got["defaults"] == {"text_prompt": DEFAULT_PROMPT, "max_new_tokens": 64, "min_score": threshold,
                               "masks": False}
    assert got["meta"]["classes"] == [] and [t["name"] for t in got["meta"]["tags"]] == ["confidence"]
    one = got["one"]["annotation"]
    assert one["size"] == {"height": 195, "width": 229}
    assert exterior_and_score(one["objects"]) == expected  # each box with its score as its confidence tag
    assert {o["geometryType"] for o in one["objects"]} == {"rectangle"}
    assert one["description"].startswith("An image of")
    assert got["one"]["data"]["prompt"] == DEFAULT_PROMPT
    assert [p["annotation"] for p in got["many"]] == [one, one]
    # sly.nn.inference.Session parsed the same answer into sly.Annotation labels
    assert got["labels"] == [[phrase, "rectangle", x1, y1, x2, y2, score, "any_number"]
                             for phrase, [[x1, y1], [x2, y2]], score in expected]
    assert got["scores"] == [score for _, _, score in expected]  # sly.nn.model.Prediction reads them as its scores
    status, body = got["errors"]["platform"]
    assert status == 400 and "Supervisely platform" in body["message"]
    status, body = got["errors"]["settings"]
    assert status == 400 and "max_new_tokens" in body["message"]


# ------------------------------------------------------------------------------------------------ the protocol


def test_an_image_becomes_one_rectangle_per_grounded_box(service):
    expected = grounded_boxes(service, SCENE)
    threshold = default_min_score(service)
    response = httpx.post(f"{service}/supervisely/inference_image", timeout=60,
                          **upload(("scene.png", SCENE.read_bytes()), settings={"settings": {"max_new_tokens": 32}}))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"source", "annotation", "name", "path", "url", "project_id", "dataset_id", "image_id",
                         "video_id", "frame_index", "slides_data", "data"}
    assert body["name"] == "scene.png"
    assert body["annotation"]["objects"] == [rectangle_object(phrase, (x1, y1, x2, y2), score)
                                             for phrase, [[x1, y1], [x2, y2]], score in objects_of(expected, threshold)]
    assert body["annotation"]["description"] == expected["text"]
    assert body["data"]["raw_text"] == expected["raw_text"]


def test_classes_keep_only_the_listed_phrases(service):
    phrases = [phrase for phrase, _, _ in objects_of(grounded_boxes(service, SCENE), default_min_score(service))]
    settings = {"settings": {"max_new_tokens": 32, "classes": [phrases[1], "a phrase it never writes"]}}
    response = httpx.post(f"{service}/supervisely/inference_image", timeout=60,
                          **upload(("scene.png", SCENE.read_bytes()), settings=settings))
    kept = [o["classTitle"] for o in response.json()["annotation"]["objects"]]
    assert kept == [phrase for phrase in phrases if phrase == phrases[1]]
    every = {"settings": {"max_new_tokens": 32, "classes": "all"}}
    response = httpx.post(f"{service}/supervisely/inference_image", timeout=60,
                          **upload(("scene.png", SCENE.read_bytes()), settings=every))
    assert [o["classTitle"] for o in response.json()["annotation"]["objects"]] == phrases


def test_text_prompt_is_a_kosmos_prompt_and_gets_grounding_when_it_lacks_it(service):
    expected = grounded_boxes(service, SCENE, prompt="<grounding> An image of")
    response = httpx.post(f"{service}/supervisely/inference_image", timeout=60, **upload(
        ("scene.png", SCENE.read_bytes()), settings={"settings": {"text_prompt": "An image of", "max_new_tokens": 32}}))
    assert response.json()["data"]["prompt"] == "<grounding> An image of"
    assert response.json()["data"]["raw_text"] == expected["raw_text"]


def test_a_batch_answers_one_prediction_per_file_in_order(service):
    files = [("a.png", SCENE.read_bytes()), ("b.png", OTHER_SCENE.read_bytes()), ("c.png", SCENE.read_bytes())]
    response = httpx.post(f"{service}/supervisely/inference_batch", timeout=120,
                          **upload(*files, settings={"settings": {"max_new_tokens": 32}}))
    assert response.status_code == 200, response.text
    got = response.json()
    assert [p["name"] for p in got] == ["a.png", "b.png", "c.png"]
    threshold = default_min_score(service)
    assert [objects_of(p["data"]) for p in got] == [objects_of(grounded_boxes(service, path), threshold)
                                                    for path in (SCENE, OTHER_SCENE, SCENE)]
    assert [exterior_and_score(p["annotation"]["objects"]) for p in got] == [objects_of(p["data"]) for p in got]


def test_settings_and_meta_routes_answer_what_session_json_reads(service):
    settings = httpx.post(f"{service}/supervisely/get_custom_inference_settings", json={"state": {}}).json()
    lines = [line for line in settings["settings"].splitlines() if not line.startswith("#")]
    threshold = default_min_score(service)
    assert lines == [f'text_prompt: "{DEFAULT_PROMPT}"', "max_new_tokens: 64", f"min_score: {threshold}",
                     "masks: false"]
    meta = httpx.post(f"{service}/supervisely/get_output_classes_and_tags").json()
    assert meta == httpx.post(f"{service}/supervisely/get_model_meta").json()
    assert meta["classes"] == [] and [(t["name"], t["value_type"]) for t in meta["tags"]] == [("confidence",
                                                                                             "any_number")]
    deploy = httpx.post(f"{service}/supervisely/get_deploy_info").json()
    assert deploy["task_type"] == "prompt-based object detection" and deploy["model_name"] == "demo"
    assert httpx.post(f"{service}/supervisely/is_deployed").json()["deployed"] is True


def test_the_routes_share_the_services_metrics_and_image_cache(service):
    for _ in range(2):
        response = httpx.post(f"{service}/supervisely/inference_image", timeout=60,
                              **upload(("s.png", OTHER_SCENE.read_bytes()), settings={"settings": {"max_new_tokens": 4}}))
    assert response.json()["data"]["image_cached"] is True
    metrics = httpx.get(f"{service}/metrics").text
    assert 'route="/supervisely/inference_image",status="200"' in metrics


# ------------------------------------------------------------------------------------------------ bad input

PNG = SCENE.read_bytes()
BAD_INPUT = [
    ("no-file-part", "inference_image", lambda: {"data": {"settings": "{}"}}, 400, ["No image", "`files`"]),
    ("no-body", "inference_image", dict, 400, ["No image"]),
    ("files-as-text-field", "inference_image", lambda: {"data": {"files": "not a file"}}, 400,
     ["files: must be a file"]),
    ("two-files", "inference_image", lambda: upload(("a.png", PNG), ("b.png", PNG)), 400,
     ["Only one file expected but got 2", "inference_batch"]),
    ("batch-without-files", "inference_batch", lambda: {"data": {"settings": "{}"}}, 400, ["No images"]),
    ("settings-not-json", "inference_image", lambda: upload(("a.png", PNG), settings="{not json"), 400,
     ["not JSON"]),
    ("settings-a-list", "inference_image", lambda: upload(("a.png", PNG), settings="[1, 2]"), 400,
     ["JSON object"]),
    ("inner-settings-a-string", "inference_image", lambda: upload(("a.png", PNG), settings={"settings": "fast"}), 400,
     ["settings must be a JSON object"]),
    ("settings-not-wrapped", "inference_image", lambda: upload(("a.png", PNG), settings={"text_prompt": "Hi"}), 400,
     ["text_prompt must sit inside settings"]),
    ("max-new-tokens-zero", "inference_image",
     lambda: upload(("a.png", PNG), settings={"settings": {"max_new_tokens": 0}}), 400, ["settings.max_new_tokens"]),
    ("max-new-tokens-over-cap", "inference_image",
     lambda: upload(("a.png", PNG), settings={"settings": {"max_new_tokens": 2000}}), 400,
     ["settings.max_new_tokens", "KOSMOS_MAX_NEW_TOKENS_CAP"]),
    ("max-new-tokens-a-word", "inference_image",
     lambda: upload(("a.png", PNG), settings={"settings": {"max_new_tokens": "many"}}), 400,
     ["settings.max_new_tokens"]),
    ("text-prompt-empty", "inference_image",
     lambda: upload(("a.png", PNG), settings={"settings": {"text_prompt": "  "}}), 400, ["text_prompt is empty"]),
    ("text-prompt-a-number", "inference_image",
     lambda: upload(("a.png", PNG), settings={"settings": {"text_prompt": 7}}), 400, ["settings.text_prompt"]),
    ("text-prompt-too-long", "inference_image",
     lambda: upload(("a.png", PNG), settings={"settings": {"text_prompt": "a" * 5000}}), 400,
     ["settings.text_prompt: The prompt is 5000 characters"]),
    ("classes-a-number", "inference_image",
     lambda: upload(("a.png", PNG), settings={"settings": {"classes": 3}}), 400, ["settings.classes must be a list"]),
    ("classes-holding-a-number", "inference_image",
     lambda: upload(("a.png", PNG), settings={"settings": {"classes": ["a star", 3]}}), 400, ["settings.classes"]),
    ("not-an-image", "inference_image", lambda: upload(("a.png", b"hello")), 400, ["cannot be decoded"]),
    ("empty-file", "inference_image", lambda: upload(("a.png", b"")), 400, ["empty"]),
    ("one-bad-image-in-a-batch", "inference_batch", lambda: upload(("a.png", PNG), ("b.txt", b"no")), 400,
     ["files[1] (b.txt)", "cannot be decoded"]),
    ("url-missing", "inference_image_url", lambda: {"json": {"state": {}}}, 400, ["state.image_url is missing"]),
    ("url-of-a-host-not-allowed", "inference_image_url",
     lambda: {"json": {"state": {"image_url": "http://example.com/a.png"}}}, 400, ["example.com"]),
    ("url-body-not-json", "inference_image_url", lambda: {"content": b"{oops"}, 400, ["not JSON"]),
    ("unknown-route", "inference_everything", lambda: {"json": {}}, 404, ["not served here", "inference_image"]),
    *[(f"needs-platform-{route}", route, lambda: {"json": {"state": {"image_id": 1}}}, 400,
       ["Supervisely platform", "inference_image"]) for route in NEEDS_PLATFORM],
]


@pytest.mark.parametrize(("route", "request_kwargs", "status", "fragments"),
                         [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_supervisely_error_shape_naming_the_problem(service, route, request_kwargs, status, fragments):
    response = httpx.post(f"{service}/supervisely/{route}", timeout=60, **request_kwargs())
    assert_supervisely_error(response, status, *fragments)


def test_a_get_on_a_served_route_names_the_method(service):
    assert_supervisely_error(httpx.get(f"{service}/supervisely/get_session_info"), 405, "takes POST")


def test_an_image_over_the_pixel_cap_is_refused_before_decoding(serve_app, demo_engine):
    settings = demo_engine.settings.model_copy(update={"max_image_pixels": 1000})
    with serve_app(create_app(ServerSettings(demo=False), settings, engine=demo_engine)) as url:
        response = httpx.post(f"{url}/supervisely/inference_image", **upload(("a.png", PNG)), timeout=60)
    assert_supervisely_error(response, 413, "pixels")


def test_while_the_model_cannot_load_the_routes_say_so_and_settings_still_answer(serve_app, tmp_path):
    app = create_app(ServerSettings(demo=False), EngineSettings(model=str(tmp_path / "no-such-model")))
    with serve_app(app, ready=False) as url:
        deadline = time.monotonic() + 30
        while app.state.service.load_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        info = httpx.post(f"{url}/supervisely/get_session_info", json={})
        image = httpx.post(f"{url}/supervisely/inference_image", **upload(("a.png", PNG)))
        settings = httpx.post(f"{url}/supervisely/get_custom_inference_settings", json={})
    assert_supervisely_error(info, 503, "no-such-model")
    assert_supervisely_error(image, 503)
    assert settings.status_code == 200 and "max_new_tokens: 128" in settings.json()["settings"]


def test_the_routes_are_behind_the_services_api_key(serve_app, demo_engine):
    app = create_app(ServerSettings(demo=False, api_key="s3cret"), demo_engine.settings, engine=demo_engine)
    with serve_app(app) as url:
        refused = httpx.post(f"{url}/supervisely/get_session_info", json={})
        allowed = httpx.post(f"{url}/supervisely/get_session_info", json={},
                             headers={"Authorization": "Bearer s3cret"})
        # SessionJSON sends no headers of its own: the key rides in its session URL, http://kosmos:s3cret@host/...,
        # which requests sends as Basic auth
        in_the_url = httpx.post(f"{url}/supervisely/get_session_info", json={}, auth=("kosmos", "s3cret"))
    assert refused.status_code == 401
    assert allowed.status_code == 200 and allowed.json()["task type"] == "prompt-based object detection"
    assert in_the_url.status_code == 200
