"""A real Label Studio uses kosmos-serve as its ML backend, end to end, on loopback.

Label Studio pins its own Django stack, so it lives in its own virtual environment
(tests/tool_environments.py: outside the checkout, created by the first run). It starts with
SQLite in a temporary data folder, a known user and legacy token, and local files served from a
temporary document root. A driver in Label Studio's environment then works through
label-studio-sdk as a user would: it creates a project with a `RectangleLabels` config, imports
the demo model's example scene three ways (an upload, a local-files storage, a data: URI), connects
kosmos-serve (`/label-studio`, behind its API key as Basic auth), asks Label Studio for the tasks'
predictions, and asks for an interactive one with a typed prompt. Label Studio validates every
prediction against the config before saving it (its prediction-validation flag is turned on), and
kosmos-serve fetches the uploads and local files from Label Studio with the token.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from local_server import serve_in_thread

from kosmos_serve.asgi import create_app
from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.engine import Engine

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # the Label Studio user's legacy API token
API_KEY = "kosmos-test-key"  # kosmos-serve's KOSMOS_API_KEY, which Label Studio sends as the Basic auth password
SCENE_OBJECTS = {"Circle": [134, 0, 221, 87], "Triangle": [40, 34, 89, 83], "Cross": [133, 98, 183, 148],
                 "Square": [45, 77, 92, 124]}  # examples/scene-four-shapes.png, 229 x 195
OTHER_SCENE_OBJECTS = {"the green star": [54, 100, 109, 152], "Square": [120, 118, 180, 178],
                       "Circle": [134, 50, 181, 97]}  # examples/scene-three-shapes.png, 288 x 229

# Runs in Label Studio's environment: argv = Label Studio URL, token, backend URL, backend key, scenes folder.
DRIVER = r'''
import base64, json, sys
from pathlib import Path
import requests
from label_studio_sdk import LabelStudio

url, token, backend, backend_key, scenes = sys.argv[1:6]
scenes = Path(scenes)
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Circle" hint="the blue circle"/>
    <Label value="Triangle" hint="the purple triangle"/>
    <Label value="Cross" hint="the yellow cross"/>
    <Label value="Square" hint="the pink square"/>
  </RectangleLabels>
  <Number name="min_score" toName="image" min="0" max="1" step="0.05"/>
</View>"""
ls = LabelStudio(base_url=url, api_key=token)
auth = {"Authorization": f"Token {token}"}
out = {"user": ls.users.whoami().email}
project = ls.projects.create(title="kosmos-serve scenes", label_config=CONFIG)

def upload(name):
    with (scenes / name).open("rb") as file:
        answer = requests.post(f"{url}/api/projects/{project.id}/import", headers=auth, files={name: file},
                               params={"return_task_ids": "true"}, timeout=60)
    answer.raise_for_status()
    return answer.json()["task_ids"][0]

tasks = {"upload": upload("scene-four-shapes.png")}
storage = ls.import_storage.local.create(project=project.id, path=str(scenes), use_blob_urls=True,
                                         regex_filter=r"scene-four-shapes\.png", title="scenes")
ls.import_storage.local.sync(id=storage.id)
data_uri = "data:image/png;base64," + base64.b64encode((scenes / "scene-four-shapes.png").read_bytes()).decode()
ls.projects.import_tasks(id=project.id, request=[{"image": data_uri}])
for task in ls.tasks.list(project=project.id):
    if task.data["image"].startswith("/data/local-files/"):
        tasks["local_files"] = task.id
    elif task.data["image"].startswith("data:"):
        tasks["data_uri"] = task.id
tasks["interactive"] = upload("scene-three-shapes.png")
out["images"] = {kind: ls.tasks.get(id=task_id).data["image"][:60] for kind, task_id in tasks.items()}

ml = ls.ml.create(project=project.id, url=backend, title="kosmos-2", is_interactive=True, auth_method="BASIC_AUTH",
                  basic_auth_user="label-studio", basic_auth_pass=backend_key)
ml = ls.ml.get(id=ml.id)
out["backend"] = {"state": ml.state, "model_version": ml.model_version, "error": ml.error_message}
# What Label Studio sends to /predict, as its own debugging route shows it
out["sent"] = requests.post(f"{url}/api/ml/{ml.id}/predict/test", params={"random": "true"}, headers=auth,
                            timeout=120).json().get("request")
batch = [task_id for kind, task_id in tasks.items() if kind != "interactive"]
ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": False, "included": batch})
out["predictions"] = {kind: [p.dict() for p in ls.predictions.list(task=tasks[kind])]
                      for kind in ("upload", "local_files", "data_uri")}
# the annotator types phrases and sets the threshold to 0 (the demo model boxes the star right but scores it low)
prompt = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                      "value": {"text": ["the green star, the orange square, the yellow circle"]}},
                     {"from_name": "min_score", "to_name": "image", "type": "number", "value": {"number": 0}}]}
out["interactive"] = requests.post(f"{url}/api/ml/{ml.id}/interactive-annotating", headers=auth,
                                   json={"task": tasks["interactive"], "context": prompt}, timeout=120).json()
print("RESULT " + json.dumps(out, default=str))
'''


def iou(a, b) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0) * max(height, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def pixel_box(region: dict) -> list[float]:
    value, width, height = region["value"], region["original_width"], region["original_height"]
    x, y = value["x"] * width / 100, value["y"] * height / 100
    return [x, y, x + value["width"] * width / 100, y + value["height"] * height / 100]


# ------------------------------------------------------------------------------------------------ fixtures


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def label_studio(label_studio_python, tmp_path_factory):
    """Label Studio on loopback (SQLite, a fresh data folder, a known user and token); yields its URL and files."""
    folder = tmp_path_factory.mktemp("label-studio")
    scenes = folder / "files" / "scenes"
    scenes.mkdir(parents=True)
    for name in ("scene-four-shapes.png", "scene-three-shapes.png"):
        (scenes / name).write_bytes((EXAMPLES / name).read_bytes())
    port = _free_port()
    environment = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(folder / "data"),
        "LABEL_STUDIO_USERNAME": "kosmos@example.com",
        "LABEL_STUDIO_PASSWORD": "kosmos-password",
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(folder / "files"),
        # Label Studio refuses ML backends and webhooks on loopback and private addresses unless told otherwise
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LATEST_VERSION_CHECK": "false",  # and no error reports or analytics: nothing leaves the machine
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        # validate every prediction against the labeling config before saving it (off by default in 1.23)
        "fflag_feat_utc_210_prediction_validation_15082025": "true",
    }
    command = [str(Path(label_studio_python).parent / "label-studio"), "start", "--no-browser",
               "--internal-host", "127.0.0.1", "--port", str(port), "--enable-legacy-api-token"]
    log = (folder / "label-studio.log").open("w")
    began = time.monotonic()
    process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=folder,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert process.poll() is None, f"Label Studio exited:\n{(folder / 'label-studio.log').read_text()[-3000:]}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() - began < 300, "Label Studio did not answer /health within 300 s"
            time.sleep(1)
        print(f"Label Studio answered /health after {time.monotonic() - began:.0f} s")
        yield {"url": url, "scenes": scenes, "log": folder / "label-studio.log"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def backend(label_studio):
    """kosmos-serve on the demo model, behind an API key, fetching task images from Label Studio with its token."""
    engine = Engine(EngineSettings(model="demo", device="cpu"))
    settings = ServerSettings(demo=False, api_key=API_KEY, label_studio_url=label_studio["url"],
                              label_studio_api_key=TOKEN)
    with serve_in_thread(create_app(settings, engine.settings, engine=engine)) as base_url:
        deadline = time.monotonic() + 60
        while httpx.get(f"{base_url}/ready").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.05)
        yield f"{base_url}/label-studio"


# ------------------------------------------------------------------------------------------------ the test


def test_label_studio_gets_predictions_from_kosmos_serve(label_studio_python, label_studio, backend):
    began = time.monotonic()
    done = subprocess.run([label_studio_python, "-c", DRIVER, label_studio["url"], TOKEN, backend, API_KEY,
                           str(label_studio["scenes"])], check=False, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (f"the driver failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n"
                                            f"Label Studio's log:\n{label_studio['log'].read_text()[-3000:]}")
    out = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"the driver took {time.monotonic() - began:.0f} s")

    assert out["user"] == "kosmos@example.com"
    assert out["images"]["upload"].startswith("/data/upload/")
    assert out["images"]["local_files"] == "/data/local-files/?d=scenes/scene-four-shapes.png"
    assert out["images"]["data_uri"].startswith("data:image/png;base64,")
    # connecting called /health and /setup: Label Studio took the backend's model version
    assert out["backend"] == {"state": "CO", "model_version": "kosmos-2:demo", "error": None}

    # what Label Studio sends is what tests/service/test_label_studio.py replays
    sent = out["sent"]
    assert set(sent) == {"tasks", "project", "label_config", "params"}
    assert sent["params"] == {"login": None, "password": None, "context": None}
    assert {"id", "data", "annotations", "predictions", "project"} <= set(sent["tasks"][0])

    threshold = httpx.get(backend.removesuffix("/label-studio") + "/info",
                          headers={"Authorization": f"Bearer {API_KEY}"}).json()["defaults"]["min_score"]
    for kind in ("upload", "local_files", "data_uri"):
        [prediction] = out["predictions"][kind]
        regions = prediction["result"]
        assert prediction["model_version"] == "kosmos-2:demo"
        # each region keeps its box's score (the default threshold or more); the task's is their mean
        assert all(threshold <= region["score"] <= 1 for region in regions), kind
        assert prediction["score"] == round(sum(region["score"] for region in regions) / len(regions), 4)
        assert sorted(region["value"]["rectanglelabels"][0] for region in regions) == sorted(SCENE_OBJECTS), kind
        for region in regions:
            assert (region["type"], region["from_name"], region["to_name"]) == ("rectanglelabels", "label", "image")
            assert (region["original_width"], region["original_height"]) == (229, 195)
            label = region["value"]["rectanglelabels"][0]
            assert iou(pixel_box(region), SCENE_OBJECTS[label]) >= 0.5, (kind, label, pixel_box(region))

    interactive = out["interactive"]["data"]
    found = {region.get("meta", {}).get("text", [None])[0] or region["value"]["rectanglelabels"][0]: region
             for region in interactive["result"]}
    assert set(found) == set(OTHER_SCENE_OBJECTS)
    for name, truth in OTHER_SCENE_OBJECTS.items():
        assert (found[name]["original_width"], found[name]["original_height"]) == (288, 229)
        assert 0 <= found[name]["score"] <= 1
        assert iou(pixel_box(found[name]), truth) >= 0.5, (name, pixel_box(found[name]))
