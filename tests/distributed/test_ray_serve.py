"""`serve --ray` on a local Ray cluster: the same answers as the plain service, two replicas sharing the load,
one image's requests on one replica, a killed replica replaced with no request lost."""

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from kosmos_serve.asgi import create_app
from kosmos_serve.cli import main
from kosmos_serve.config import EngineSettings, ServerSettings

EXAMPLES = Path(__file__).parents[2] / "examples"
SCENE = (EXAMPLES / "scene-four-shapes.png").read_bytes()
VARYING = ("timings", "image_cached")  # a request's own: its time, and whether its image was cached


def variant(number: int) -> str:
    """The scene as another image (base64 PNG): its corner pixel set from `number`, so other bytes (another routing
    key) and other pixels (another entry in the image-feature cache, which is keyed on pixels)."""
    image = Image.open(io.BytesIO(SCENE)).convert("RGB")
    image.putpixel((0, 0), (number % 256, number // 256 % 256, 255 - number % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stable(answer: dict) -> dict:
    return {key: value for key, value in answer.items() if key not in VARYING}


def sse_result(text: str) -> dict:
    """The data of a server-sent event stream's `result` event."""
    lines = text.splitlines()
    data = lines[lines.index("event: result") + 1]
    assert data.startswith("data: ")
    return json.loads(data.removeprefix("data: "))


def post_retrying(client: httpx.Client, path: str, **kwargs) -> httpx.Response:
    """What a well-behaved client does: retry only on 503 with Retry-After."""
    for _ in range(20):
        response = client.post(path, **kwargs)
        if response.status_code != 503 or "retry-after" not in response.headers:
            return response
        time.sleep(min(float(response.headers["retry-after"]), 2))
    return response


def test_a_replica_without_the_model_stops_the_deploy_with_its_error(ray_cluster, tmp_path):
    began = time.monotonic()
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "no-model"), "--port", str(free_port()),
                                       "--ray", "--replicas", "2"], catch_exceptions=False)
    assert result.exit_code == 1
    assert "The service could not start on Ray: the replica on " in result.output
    assert "is not a folder" in result.output and "Traceback" not in result.output
    assert time.monotonic() - began < 120
    from ray import serve

    serve.shutdown()  # Serve keeps its first HTTP port; the next deploy starts it afresh on its own


@pytest.fixture(scope="module")
def service(ray_cluster):
    """The application with 2 replicas of the demo model; yields its base URL (every replica ready)."""
    from ray import serve

    from kosmos_serve.distributed.ray_serve import ServeOptions, deploy

    port = free_port()
    deploy(ServerSettings(port=port), EngineSettings(model="demo"), ServeOptions(replicas=2))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications["kosmos-serve"].deployments["KosmosReplica"]
    return status.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def plain():
    """The plain service in this process, on the demo model."""
    with TestClient(create_app(ServerSettings(demo=False), EngineSettings(model="demo"))) as client:
        for _ in range(600):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        yield client


def test_every_replica_is_ready_when_deploy_returns(service):
    assert running_replicas() == 2
    assert httpx.get(f"{service}/ready").status_code == 200


def test_drop_in_predict_answers_as_the_plain_service(service, plain):
    files = {"content": ("scene.png", SCENE, "image/png")}
    ours = httpx.post(f"{service}/predict", files=files, timeout=60)
    theirs = plain.post("/predict", files=files)
    assert ours.status_code == theirs.status_code == 200
    assert ours.json() == theirs.json()
    assert ours.headers["x-kosmos-replica"]


def test_v1_generate_answers_as_the_plain_service(service, plain):
    body = {"image": base64.b64encode(SCENE).decode(), "task": "phrase_grounding", "phrases": ["the blue circle"]}
    ours = httpx.post(f"{service}/v1/generate", json=body, timeout=60)
    theirs = plain.post("/v1/generate", json=body)
    assert ours.status_code == theirs.status_code == 200
    assert stable(ours.json()) == stable(theirs.json())
    streamed = httpx.post(f"{service}/v1/generate", json={**body, "stream": True}, timeout=60)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.count("event: result") == 1
    plain_streamed = plain.post("/v1/generate", json={**body, "stream": True})
    assert stable(sse_result(streamed.text)) == stable(sse_result(plain_streamed.text)) == stable(theirs.json())
    bad = httpx.post(f"{service}/v1/generate", json={**body, "task": "no_such_task"}, timeout=60)
    assert bad.status_code == plain.post("/v1/generate", json={**body, "task": "no_such_task"}).status_code == 422


def test_concurrent_requests_are_answered_by_both_replicas(service):
    images = [variant(number) for number in range(16)]  # 16 files, 16 keys

    def caption(image):
        return httpx.post(f"{service}/v1/generate", json={"image": image, "task": "caption"}, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(caption, [base64.b64encode(SCENE).decode()] + images))
    assert {answer.status_code for answer in answers} == {200}
    assert len({answer.headers["x-kosmos-replica"] for answer in answers}) == 2


def test_one_image_stays_on_one_replica_and_its_cache(service):
    for number in (100, 101):  # by chance alone (two replicas), both images' requests would stay put 1 time in 64
        image = variant(number)
        answers = [httpx.post(f"{service}/v1/generate", json={"image": image, "task": task}, timeout=60)
                   for task in ("caption", "detailed_caption", "caption", "detailed_caption")]
        assert len({answer.headers["x-kosmos-replica"] for answer in answers}) == 1
        assert [answer.json()["image_cached"] for answer in answers] == [False, True, True, True]


def test_a_killed_replica_is_replaced_and_no_request_is_lost(service):
    import ray

    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
             if "#KosmosReplica#" in actor["name"]]
    assert len(names) == 2
    victim = names[0]
    images = [variant(200 + number) for number in range(40)]
    done = threading.Event()
    answered = []

    def detailed(image):
        with httpx.Client(base_url=service, timeout=120) as client:
            answer = post_retrying(client, "/v1/generate", json={"image": image, "task": "detailed_caption"})
        answered.append(answer.status_code)
        done.set()
        return answer

    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(detailed, image) for image in images]
        done.wait(60)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        answered_before_kill = len(answered)
        statuses = [answer.result().status_code for answer in answers]
    assert answered_before_kill < len(images) - 8, "the replica was killed after the run, not during it"
    assert statuses == [200] * len(images)
    deadline = time.monotonic() + 90
    while running_replicas() != 2 or victim in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    assert httpx.post(f"{service}/v1/generate", json={"image": images[0], "task": "caption"}, timeout=60).status_code == 200
