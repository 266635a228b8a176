"""The Label Studio ML backend under /label-studio: the wire format, with the exact payload Label Studio sends.

The service runs on the shipped demo model, so every region is a real grounding of the example scenes
and is checked against the scene's true boxes. A small HTTP server stands in for Label Studio's file
routes (`/data/upload/...`, `/data/local-files/...`, `/api/token/refresh/`), checking the token the
way Label Studio does; tests/integration/test_label_studio_server.py runs the real Label Studio.
"""

from __future__ import annotations

import base64
import copy
import http.server
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from local_server import serve_in_thread

from kosmos_serve.asgi import create_app
from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.engine import Engine
from kosmos_serve.server.label_studio.config import DetectionConfig, LabelSpec, detection_plan, parse_labeling_config

REPO = Path(__file__).resolve().parents[2]
SCENE = REPO / "examples" / "scene-four-shapes.png"  # 229 x 195
OTHER_SCENE = REPO / "examples" / "scene-three-shapes.png"  # 288 x 229
# The scenes' true boxes (pixels), from the synthetic-scene records they were drawn from.
SCENE_OBJECTS = {"the blue circle": [134, 0, 221, 87], "the purple triangle": [40, 34, 89, 83],
                 "the yellow cross": [133, 98, 183, 148], "the pink square": [45, 77, 92, 124]}
OTHER_SCENE_OBJECTS = {"the green star": [54, 100, 109, 152], "the orange square": [120, 118, 180, 178],
                       "the yellow circle": [134, 50, 181, 97]}
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
API_KEY = "kosmos-test-key"
UPLOAD = "/data/upload/5/5b33a4db-scene-four-shapes.png"

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Circle" hint="the blue circle"/>
    <Label value="Triangle" hint="the purple triangle"/>
    <Label value="Cross" hint="the yellow cross"/>
    <Label value="Square" hint="the pink square"/>
  </RectangleLabels>
</View>"""
LABELS = {"Circle": "the blue circle", "Triangle": "the purple triangle", "Cross": "the yellow cross",
          "Square": "the pink square"}

# What Label Studio 1.23.2 sent to /predict for one uploaded image (its /api/ml/<id>/predict/test route shows
# the request; label_studio/ml/api_connector.py builds it), the upload renamed to the scene used here.
LABEL_STUDIO_PREDICT = {
    "tasks": [{"id": 16, "data": {"image": UPLOAD}, "meta": {}, "created_at": "2026-12-01T17:50:25.121508Z",
               "updated_at": "2026-12-01T17:50:25.124876Z", "is_labeled": False, "overlap": 1, "inner_id": 4,
               "total_annotations": 0, "cancelled_annotations": 0, "total_predictions": 0, "comment_count": 0,
               "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 5, "updated_by": None,
               "file_upload": 8, "comment_authors": [], "annotations": [], "predictions": []}],
    "project": "5.1796147424",
    "label_config": LABEL_CONFIG,
    "params": {"login": None, "password": None, "context": None},
}
# And to /setup when the backend is connected (api_connector.MLApi.setup).
LABEL_STUDIO_SETUP = {"project": "5.1796147424", "schema": LABEL_CONFIG, "hostname": "http://localhost:8080",
                      "access_token": LEGACY_TOKEN, "extra_params": None}


def iou(a, b) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0) * max(height, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def pixel_box(region: dict) -> list[float]:
    """A region's box back in pixels of the original image."""
    value, width, height = region["value"], region["original_width"], region["original_height"]
    x, y = value["x"] * width / 100, value["y"] * height / 100
    return [x, y, x + value["width"] * width / 100, y + value["height"] * height / 100]


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def assert_label_studio_error(response: httpx.Response, status: int, *fragments: str) -> None:
    """The ML backend's own error shape, `{"status", "detail"}` (and the service's code), naming the problem."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"status", "detail", "code"} and body["status"] == status, body
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]


# ------------------------------------------------------------------------------------------------ fixtures


def _jwt(payload: dict) -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.signature"


PERSONAL_ACCESS_TOKEN = _jwt({"token_type": "refresh", "exp": 8103347435, "user_id": "1"})


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """A stand-in for Label Studio's file routes: the token rules of Label Studio, and a log of what was asked."""
    files = {UPLOAD: SCENE.read_bytes(), "/data/local-files/?d=scenes/scene-three-shapes.png": OTHER_SCENE.read_bytes()}
    seen: list[tuple[str, str | None]] = []
    access = _jwt({"token_type": "access", "exp": time.time() + 300})

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            authorization = self.headers.get("Authorization")
            seen.append((self.path, authorization))
            if authorization not in (f"Token {LEGACY_TOKEN}", f"Bearer {access}"):
                return self._answer(401, b'{"detail": "Authentication credentials were not provided."}')
            if self.path not in files:
                return self._answer(404, b'{"detail": "Not found."}')
            self._answer(200, files[self.path], "image/png")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, json.dumps(body)))
            if self.path == "/api/token/refresh/" and body.get("refresh") == PERSONAL_ACCESS_TOKEN:
                return self._answer(200, json.dumps({"access": access}).encode())
            self._answer(401, b'{"detail": "Token is invalid"}')

        def _answer(self, status: int, body: bytes, kind: str = "application/json"):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", seen=seen)
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def demo_engine():
    """The shipped demo model: it really grounds the example scenes."""
    return Engine(EngineSettings(model="demo", device="cpu"))


@pytest.fixture(scope="module")
def backend(demo_engine, label_studio, tmp_path_factory):
    """The service on the demo model, told where Label Studio is; yields `/label-studio`'s URL."""
    root = tmp_path_factory.mktemp("document-root")
    (root / "scenes").mkdir()
    (root / "scenes" / "scene-four-shapes.png").write_bytes(SCENE.read_bytes())
    settings = ServerSettings(demo=False, label_studio_url=label_studio.url, label_studio_api_key=LEGACY_TOKEN,
                              label_studio_local_files_document_root=str(root))
    with serve_in_thread(create_app(settings, demo_engine.settings, engine=demo_engine)) as base_url:
        yield f"{base_url}/label-studio"


@pytest.fixture
def serve_backend(demo_engine):
    """Another service on the demo model with these settings: `with serve_backend(**settings) as url`."""

    def start(**settings):
        app = create_app(ServerSettings(demo=False, **settings), demo_engine.settings, engine=demo_engine)
        return _served(app)

    return start


class _served:
    def __init__(self, app):
        self.context = serve_in_thread(app)

    def __enter__(self):
        base_url = self.context.__enter__()
        return f"{base_url}/label-studio"

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)



def predict(backend: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{backend}/predict", json=body, timeout=120, **kwargs)


# ------------------------------------------------------------------------------------------------ the protocol


def test_health_setup_and_webhook_answer_as_the_ml_backend_does(backend):
    assert httpx.get(f"{backend}/health").json() == {"status": "UP", "model_class": "Kosmos2"}
    assert httpx.get(f"{backend}/").json() == {"status": "UP", "model_class": "Kosmos2"}
    assert httpx.post(f"{backend}/setup", json=LABEL_STUDIO_SETUP).json() == {"model_version": "kosmos-2:demo"}
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 5, "label_config": LABEL_CONFIG},
             "annotation": {"id": 1, "result": []}, "task": {"id": 16}}
    created = httpx.post(f"{backend}/webhook", json=event)
    assert created.status_code == 201 and created.json() == {"result": None, "status": "ok"}
    other = httpx.post(f"{backend}/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 5}})
    assert other.status_code == 200 and other.json() == {"status": "Unknown event"}


def test_the_exact_payload_label_studio_sends_gets_a_region_per_label_on_the_scene(backend, label_studio):
    answer = predict(backend, LABEL_STUDIO_PREDICT)

    assert answer.status_code == 200, answer.text
    [prediction] = answer.json()["results"]
    regions = prediction["result"]
    threshold = httpx.get(backend.removesuffix("/label-studio") + "/info").json()["defaults"]["min_score"]
    assert prediction["model_version"] == "kosmos-2:demo"
    assert prediction["score"] == round(sum(r["score"] for r in regions) / len(regions), 4)  # their mean
    assert sorted(r["value"]["rectanglelabels"][0] for r in regions) == sorted(LABELS)
    for region in regions:
        assert {key: region[key] for key in ("from_name", "to_name", "type", "original_width", "original_height",
                                             "image_rotation")} == {
            "from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 229,
            "original_height": 195, "image_rotation": 0}
        assert threshold <= region["score"] <= 1  # the box's own score, kept by the service's default threshold
        assert region["value"]["rotation"] == 0 and len(region["id"]) == 10
        phrase = LABELS[region["value"]["rectanglelabels"][0]]
        assert iou(pixel_box(region), SCENE_OBJECTS[phrase]) >= 0.5, (phrase, pixel_box(region))
    # the upload was fetched from Label Studio's address with its token, as the ML backend SDK sends it
    assert (UPLOAD, f"Token {LEGACY_TOKEN}") in label_studio.seen


def test_regions_are_the_detection_tasks_boxes_in_percent(backend):
    phrases = list(LABELS.values())
    reference = httpx.post(backend.removesuffix("/label-studio") + "/v1/generate",
                           json={"image": data_uri(SCENE), "task": "detection", "phrases": phrases}, timeout=60).json()
    body = copy.deepcopy(LABEL_STUDIO_PREDICT)
    body["tasks"][0]["data"]["image"] = data_uri(SCENE)

    regions = predict(backend, body).json()["results"][0]["result"]

    expected = [(label, [100 * v for v in box], score) for entity in reference["entities"]
                for label in [next(k for k, v in LABELS.items() if v == entity["phrase"])]
                for box, score in zip(entity["boxes"], entity["scores"], strict=True)]
    got = [(r["value"]["rectanglelabels"][0], [r["value"]["x"], r["value"]["y"], r["value"]["x"] + r["value"]["width"],
                                               r["value"]["y"] + r["value"]["height"]], r["score"]) for r in regions]
    assert [label for label, _, _ in got] == [label for label, _, _ in expected]
    for (_, box, score), (_, want, want_score) in zip(got, expected):
        assert box == pytest.approx(want) and score == want_score  # each region: its box, with the box's score


def test_several_tasks_of_every_image_kind_answer_in_order(backend, label_studio):
    body = copy.deepcopy(LABEL_STUDIO_PREDICT)
    first = body["tasks"][0]
    body["tasks"] = [
        first,
        {**first, "id": 17, "data": {"image": data_uri(OTHER_SCENE)}},
        {**first, "id": 18, "data": {"image": "/data/local-files/?d=scenes/scene-four-shapes.png"}},  # on disk
        {**first, "id": 19, "data": {"image": "/data/local-files/?d=scenes/scene-three-shapes.png"}},  # fetched
        {**first, "id": 20, "data": {"image": f"{label_studio.url}{UPLOAD}"}},  # absolute, on Label Studio
    ]

    results = predict(backend, body).json()["results"]

    sizes = [(r["result"][0]["original_width"], r["result"][0]["original_height"]) for r in results]
    assert sizes == [(229, 195), (288, 229), (229, 195), (288, 229), (229, 195)]
    assert results[0]["result"][0]["value"] == results[2]["result"][0]["value"] == results[4]["result"][0]["value"]
    assert ("/data/local-files/?d=scenes/scene-four-shapes.png", f"Token {LEGACY_TOKEN}") not in label_studio.seen


def test_a_textarea_prompt_replaces_the_labels_and_each_phrase_finds_its_label(backend):
    body = copy.deepcopy(LABEL_STUDIO_PREDICT)
    body["tasks"][0]["data"]["image"] = data_uri(OTHER_SCENE)
    # a threshold of 0 keeps every box: the demo model boxes the star right, but gives it a low score
    body["label_config"] = LABEL_CONFIG.replace("</View>", '<Number name="min_score" toName="image" defaultValue="0"/>'
                                                           "</View>")
    body["params"]["context"] = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                                             "value": {"text": ["the green star, the orange square, the yellow circle"]}}]}

    regions = predict(backend, body).json()["results"][0]["result"]

    labelled = {(r.get("meta") or {}).get("text", [None])[0] or r["value"]["rectanglelabels"][0]: r for r in regions}
    assert set(labelled) == {"the green star", "Square", "Circle"}
    assert labelled["the green star"]["value"]["rectanglelabels"] == []  # no label fits a star: the annotator picks
    for name, phrase in [("the green star", "the green star"), ("Square", "the orange square"),
                         ("Circle", "the yellow circle")]:
        assert iou(pixel_box(labelled[name]), OTHER_SCENE_OBJECTS[phrase]) >= 0.5, name


def test_label_phrases_come_from_predicted_values_then_hint_then_value():
    config = parse_labeling_config('<View><Image name="i" value="$img"/><RectangleLabels name="r" toName="i">'
                                   '<Label value="Shape" predicted_values="the blue circle,the pink square"/>'
                                   '<Label value="Cross" hint="the yellow cross" alias="X"/><Label value="star"/>'
                                   '</RectangleLabels></View>')
    plan = detection_plan(config, None)
    assert [(phrase, label.value) for phrase, label in plan.items()] == [
        ("the blue circle", "Shape"), ("the pink square", "Shape"), ("the yellow cross", "Cross"), ("star", "star")]
    lone = DetectionConfig("r", "i", "img", (LabelSpec("Shape", ("shape",)),), prompt_from="p")
    typed = {"result": [{"from_name": "p", "value": {"text": ["the blue circle\nthe pink square"]}}]}
    assert {phrase: label.value for phrase, label in detection_plan(lone, typed).items()} == {
        "the blue circle": "Shape", "the pink square": "Shape"}  # one label: every typed phrase is it


def test_a_personal_access_token_is_exchanged_for_an_access_token(serve_backend, label_studio):
    body = copy.deepcopy(LABEL_STUDIO_PREDICT)
    with serve_backend(label_studio_url=label_studio.url, label_studio_api_key=PERSONAL_ACCESS_TOKEN) as url:
        answer = predict(url, body)
    assert answer.status_code == 200 and len(answer.json()["results"][0]["result"]) == 4
    refresh = [entry for entry in label_studio.seen if entry[0] == "/api/token/refresh/"]
    assert refresh and json.loads(refresh[-1][1]) == {"refresh": PERSONAL_ACCESS_TOKEN}
    assert label_studio.seen[-1][0] == UPLOAD and label_studio.seen[-1][1].startswith("Bearer ")


def test_the_api_key_is_taken_as_label_studios_basic_auth_password(serve_backend):
    with serve_backend(api_key=API_KEY) as url:
        with_key = httpx.get(f"{url}/health", auth=("label-studio", API_KEY))
        wrong = httpx.get(f"{url}/health", auth=("label-studio", "not-the-key"))
        without = httpx.post(f"{url}/predict", json=LABEL_STUDIO_PREDICT)
        bearer = httpx.post(f"{url}/setup", json=LABEL_STUDIO_SETUP, headers={"Authorization": f"Bearer {API_KEY}"})
    assert with_key.status_code == 200 and bearer.status_code == 200
    assert_label_studio_error(wrong, 401, "A valid API key is needed")
    assert_label_studio_error(without, 401, "A valid API key is needed")


def test_health_is_503_until_the_model_is_ready(demo_engine):
    app = create_app(ServerSettings(demo=False), demo_engine.settings, engine=demo_engine)
    with serve_in_thread(app) as base_url:
        app.state.service.batcher, batcher = None, app.state.service.batcher  # as while the model loads
        answer = httpx.get(f"{base_url}/label-studio/health")
        app.state.service.batcher = batcher
    assert_label_studio_error(answer, 503, "still loading")
    assert answer.headers["Retry-After"] == "5"


# ------------------------------------------------------------------------------------------------ bad input


def _with(**changes) -> dict:
    body = copy.deepcopy(LABEL_STUDIO_PREDICT)
    for key, value in changes.items():
        if key == "image":
            body["tasks"][0]["data"]["image"] = value
        elif value is None:
            body.pop(key)
        else:
            body[key] = value
    return body


TWO_IMAGES = ('<View><Image name="a" value="$a"/><Image name="b" value="$b"/><RectangleLabels name="l" toName="a,b">'
              '<Label value="x"/></RectangleLabels></View>')
BAD_BODIES = {
    "no tasks": (_with(tasks=None), 422, ["tasks: Field required"]),
    "no label config": (_with(label_config=None), 422, ["label_config: Field required"]),
    "a task without data": (_with(tasks=[{"id": 3}]), 422, ["tasks.0.data: Field required"]),
    "tasks not a list": (_with(tasks={"id": 3}), 422, ["tasks: Input should be a valid list"]),
    "no image in the task": (_with(tasks=[{"id": 3, "data": {"text": "hi"}}]), 422,
                             ["Task 3 has no data.image", '<Image name="image" value="$image">']),
    "image not a string": (_with(image=42), 422, ["Task 16: data.image must be the image's URL or data: URI"]),
    "no RectangleLabels": (_with(label_config='<View><Image name="i" value="$i"/><Choices name="c" toName="i">'
                                 '<Choice value="a"/></Choices></View>'), 422, ["no <RectangleLabels> control"]),
    "RectangleLabels on text": (_with(label_config='<View><Text name="t" value="$t"/><RectangleLabels name="l" '
                                      'toName="t"><Label value="x"/></RectangleLabels></View>'), 422,
                                ["points at an <Image>"]),
    "two images": (_with(label_config=TWO_IMAGES), 422, ["names 2 objects (a, b); point it at one <Image>"]),
    "no labels": (_with(label_config='<View><Image name="i" value="$i"/><RectangleLabels name="l" toName="i"/>'
                        '</View>'), 422, ['<RectangleLabels name="l"> has no <Label>']),
    "not XML": (_with(label_config="<View><Image"), 422, ["not well-formed XML"]),
    "entities": (_with(label_config='<!DOCTYPE v [<!ENTITY a "aaaa">]><View>&a;</View>'), 422, ["DOCTYPE"]),
    "a phrase Kosmos-2 cannot take": (_with(label_config=LABEL_CONFIG.replace("the blue circle", "a &lt;b&gt;")),
                                      422, ["Task 16:", "'<' or '>'"]),
    "another host": (_with(image="http://example.com/a.png"), 400, ["not on Label Studio", "Label Studio only"]),
    "cloud storage": (_with(image="s3://bucket/a.png"), 400, ["cloud storage"]),
    "a plain name": (_with(image="a.png"), 400, ["neither a data: URI nor a Label Studio upload"]),
    "a local file outside the root": (_with(image="/data/local-files/?d=../../etc/passwd"), 400,
                                      ["lies outside the document root"]),
    "an upload Label Studio does not have": (_with(image="/data/upload/5/missing.png"), 400, ["answered HTTP 404"]),
    "bad base64": (_with(image="data:image/png;base64,@@@"), 400, ["not valid base64"]),
    "not an image": (_with(image="data:image/png;base64," + base64.b64encode(b"hello").decode()), 400, ["Task 16:"]),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_input_gets_the_ml_backends_error_shape_naming_the_problem(backend, case):
    body, status, fragments = BAD_BODIES[case]
    assert_label_studio_error(predict(backend, body), status, *fragments)


def test_bad_bodies_on_the_other_routes(backend):
    assert_label_studio_error(httpx.post(f"{backend}/setup", json={"project": "1.2"}), 422, "schema: Field required")
    assert_label_studio_error(httpx.post(f"{backend}/setup", json={"schema": "<View/>"}), 422, "no <RectangleLabels>")
    assert_label_studio_error(httpx.post(f"{backend}/webhook", json={"project": {}}), 422, "action: Field required")
    assert_label_studio_error(httpx.post(f"{backend}/predict", content=b"{not json",
                                         headers={"Content-Type": "application/json"}), 422, "JSON")
    assert_label_studio_error(httpx.post(f"{backend}/webhook", content=b"\x80\x81",
                                         headers={"Content-Type": "application/json"}), 400, "parsing the body")
    assert_label_studio_error(httpx.get(f"{backend}/predict"), 405, "Method Not Allowed")
    assert_label_studio_error(httpx.get(f"{backend}/train"), 404, "Not Found")


def test_label_studio_files_need_label_studios_address_and_token(serve_backend, label_studio):
    with serve_backend() as url:
        unset = predict(url, LABEL_STUDIO_PREDICT)
    with serve_backend(label_studio_url=label_studio.url) as url:
        no_token = predict(url, LABEL_STUDIO_PREDICT)
    with serve_backend(label_studio_url=label_studio.url, label_studio_api_key="wrong-token") as url:
        wrong_token = predict(url, LABEL_STUDIO_PREDICT)
    with serve_backend(label_studio_url=label_studio.url, label_studio_api_key=PERSONAL_ACCESS_TOKEN + "x") as url:
        wrong_pat = predict(url, LABEL_STUDIO_PREDICT)
    with serve_backend(label_studio_url=label_studio.url, label_studio_api_key=LEGACY_TOKEN,
                       max_upload_bytes=1000) as url:
        too_big = predict(url, LABEL_STUDIO_PREDICT)
    assert_label_studio_error(unset, 400, "Task 16:", "set LABEL_STUDIO_URL")
    assert_label_studio_error(no_token, 400, "answered HTTP 401", "Set LABEL_STUDIO_API_KEY")
    assert_label_studio_error(wrong_token, 400, "answered HTTP 401", "Label Studio refused LABEL_STUDIO_API_KEY")
    assert_label_studio_error(wrong_pat, 400, "refused LABEL_STUDIO_API_KEY, a personal access token")
    assert_label_studio_error(too_big, 413, "larger than the 1000-byte upload limit")


def test_a_body_over_the_upload_cap_is_refused_in_the_same_shape(serve_backend):
    body = copy.deepcopy(LABEL_STUDIO_PREDICT)
    body["tasks"][0]["data"]["image"] = data_uri(SCENE)
    with serve_backend(max_upload_bytes=1000) as url:
        answer = predict(url, body)
    assert_label_studio_error(answer, 413, "larger than the 1000-byte upload limit")


def test_the_environment_uses_label_studios_own_names(monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:8080/")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY_TOKEN)
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", "/srv/images")
    settings = ServerSettings()
    assert settings.label_studio_url == "http://127.0.0.1:8080"
    assert settings.label_studio_api_key.get_secret_value() == LEGACY_TOKEN
    assert settings.label_studio_local_files_document_root == "/srv/images"
    monkeypatch.setenv("LABEL_STUDIO_URL", "127.0.0.1:8080")
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        ServerSettings()
