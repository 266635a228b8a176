"""`--url`: the same benchmark through a real service on loopback gives the same predictions as the engine here."""

import base64
import io
import json
import time

import httpx
import pytest
from click.testing import CliRunner
from local_server import serve_in_thread
from PIL import Image

from kosmos_serve.asgi import create_app
from kosmos_serve.cli import main
from kosmos_serve.config import ServerSettings
from kosmos_serve.engine import GenerationParams
from kosmos_serve.evaluation.backends import LocalBackend, ServiceBackend, has_rotation, load_stored_pixels
from kosmos_serve.evaluation.datasets import read_splits
from kosmos_serve.evaluation.detection import read_detection_splits
from kosmos_serve.evaluation.runner import PredictionLog, Settings, evaluate_benchmark, run

ORIENTATION = 0x0112
TOKENS = 24


@pytest.fixture(scope="module")
def service(demo_engine):
    """The demo model served on loopback, batching up to 8 concurrent requests."""
    app = create_app(ServerSettings(demo=False, max_batch_requests=8), demo_engine.settings, engine=demo_engine)
    with serve_in_thread(app) as url:
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/ready").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.05)
        yield url


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("benchmark", ["refcoco", "flickr30k"])
def test_the_service_gives_the_same_predictions_as_the_engine_here(shapes, demo_engine, service, tmp_path, benchmark):
    annotations = shapes.refcoco if benchmark == "refcoco" else shapes.flickr30k
    remote = tmp_path / "remote.jsonl"
    outcome = evaluate_benchmark(benchmark, [annotations], shapes.folder, url=service, out=remote, limit=12,
                                 max_new_tokens=TOKENS)
    assert outcome.source == service and len(outcome.results[0].records) == 12

    local = tmp_path / "local.jsonl"
    splits = read_splits(benchmark, [annotations], shapes.folder, limit=12)
    params = GenerationParams(max_new_tokens=TOKENS, no_repeat_ngram_size=3)
    run(splits, LocalBackend(demo_engine, params), PredictionLog(local, Settings("demo", TOKENS, 3)))
    assert read_lines(remote) == read_lines(local)


def test_detection_through_the_service_gives_the_same_boxes_and_scores_as_here(shapes, detection_file, demo_engine,
                                                                               service, tmp_path):
    """One request in flight at a time: batched, a request's scores depend on what joins the batch around it."""
    params = GenerationParams(max_new_tokens=TOKENS, no_repeat_ngram_size=3, min_score=0.0)
    splits = read_detection_splits([detection_file], shapes.folder, limit=4)
    remote, local = tmp_path / "remote.jsonl", tmp_path / "local.jsonl"
    backend = ServiceBackend(service, params, concurrency=1)
    run(splits, backend, PredictionLog(remote, Settings(backend.model, TOKENS, 3, "coco")))
    run(splits, LocalBackend(demo_engine, params), PredictionLog(local, Settings("demo", TOKENS, 3, "coco")))
    lines = read_lines(remote)
    assert lines == read_lines(local) and len(lines) == 4
    assert sum(len(item["scores"]) for line in lines for item in line["asked"]) >= 4 * 4  # boxes, each scored


def test_detection_through_the_cli_and_a_service(shapes, detection_file, service, tmp_path):
    out = tmp_path / "remote.jsonl"
    outcome = evaluate_benchmark("detection", [detection_file], shapes.folder, url=service, out=out, limit=4,
                                 max_new_tokens=TOKENS)
    assert outcome.source == service and len(outcome.results[0].records) == 4
    items = [item for line in read_lines(out) for item in line["asked"]]
    assert all(len(item["scores"]) == len(item["boxes"]) for item in items) and any(item["boxes"] for item in items)


def test_the_cli_scores_through_the_service(shapes, service):
    result = CliRunner().invoke(main, ["evaluate", "--benchmark", "refcoco", "--url", service, "--annotations",
                                       str(shapes.refcoco), "--images", str(shapes.folder), "--limit", "4",
                                       "--max-new-tokens", str(TOKENS)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"demo ({service}): greedy, no_repeat_ngram_size 3, max_new_tokens {TOKENS}")


def test_the_cli_sends_kosmos_api_key_to_a_service_that_needs_one(shapes, demo_engine, monkeypatch):
    app = create_app(ServerSettings(demo=False, api_key="s3cret"), demo_engine.settings, engine=demo_engine)
    arguments = ["evaluate", "--benchmark", "refcoco", "--url", None, "--annotations", str(shapes.refcoco),
                 "--images", str(shapes.folder), "--limit", "2", "--max-new-tokens", "4"]
    with serve_in_thread(app) as url:
        arguments[4] = url
        while httpx.get(f"{url}/ready").status_code != 200:
            time.sleep(0.05)
        refused = CliRunner().invoke(main, arguments)
        monkeypatch.setenv("KOSMOS_API_KEY", "s3cret")
        answered = CliRunner().invoke(main, arguments)
    assert refused.exit_code == 1 and "KOSMOS_API_KEY" in refused.output
    assert answered.exit_code == 0, answered.output


def test_an_unreachable_service_is_one_line(shapes):
    result = CliRunner().invoke(main, ["evaluate", "--benchmark", "refcoco", "--url", "http://127.0.0.1:9",
                                       "--annotations", str(shapes.refcoco), "--images", str(shapes.folder)])
    assert result.exit_code == 1
    assert result.output == ("Error: The service at http://127.0.0.1:9 cannot be reached (ConnectError); is "
                             "`kosmos-serve serve` running there?\n")


def test_images_are_read_as_stored_without_exif_rotation(tmp_path):
    """COCO's and Flickr30k's boxes are drawn on the stored pixels: a file's EXIF rotation is not applied."""
    stored = Image.new("RGB", (60, 40), (200, 30, 30))
    stored.paste((30, 30, 200), (0, 0, 20, 10))  # a blue corner at the top left of the stored pixels
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # a viewer would turn it 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    stored.save(path, format="JPEG", exif=exif, quality=95)

    assert has_rotation(path)
    image = load_stored_pixels(path)
    assert image.size == (60, 40) and image.getpixel((5, 5))[2] > 150
    sent = Image.open(io.BytesIO(base64.b64decode(ServiceBackend._payload(path))))
    assert sent.format == "PNG" and sent.size == (60, 40) and sent.getexif().get(ORIENTATION) is None

    plain = tmp_path / "plain.png"
    stored.save(plain)
    assert not has_rotation(plain)
    assert ServiceBackend._payload(plain) == base64.b64encode(plain.read_bytes()).decode()
