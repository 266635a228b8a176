"""The demo page's Gradio API through the real `gradio_client`: one named endpoint, everything labelled.

The page's UI-only events (task fields, sampling sliders, box corners) are private: a client neither
sees nor calls them. Its one public action, running a task on an image, answers like the Run button.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from local_server import serve_in_thread
from PIL import Image

from kosmos_serve.asgi import create_app
from kosmos_serve.config import ServerSettings

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # gradio's and its dependencies' own

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shapes.png"
ENDPOINT = "/predict"
PARAMETERS = ["image", "task", "prompt", "phrases", "boxes", "grounding", "sample", "top_p", "temperature",
              "max_new_tokens", "masks"]
LABELS = ["Image", "Task", "Prompt or question", "Phrases (one per line)", "Boxes (x1,y1,x2,y2 in pixels, one per line)",
          "Grounding (<grounding> goes first)", "Sample (top-p) instead of greedy decoding", "Top-p", "Temperature"]
RETURNS = ["Grounded image", "Grounded text (HTML)", "Download the annotated image (PNG)", "Raw generation",
           "Result (JSON)"]
UNNAMED = re.compile(r"^(value|parameter)_\d+$")  # gradio's name for a component without a label


@pytest.fixture(scope="module")
def demo_client(engine, tmp_path_factory):
    """A gradio_client.Client on the demo page of a ready service on loopback (tiny model)."""
    app = create_app(ServerSettings(demo=True), engine.settings, engine=engine)
    with pytest.MonkeyPatch.context() as env, serve_in_thread(app) as base_url:  # as `serve_app`, for the module
        # The client holds a heartbeat stream open, which the server's shutdown waits for: beat often, so that
        # the closed client lets go at once rather than after gradio's 15 seconds.
        env.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.2")
        deadline = time.monotonic() + 60
        while httpx.get(f"{base_url}/ready").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.05)
        client = gradio_client.Client(f"{base_url}/demo/", verbose=False,
                                      download_files=str(tmp_path_factory.mktemp("client-downloads")))
        yield client
        client.close()  # its heartbeat stream would hold the server's shutdown


def test_the_api_lists_only_the_named_run_endpoint_with_every_input_and_output_labelled(demo_client):
    api = demo_client.view_api(return_format="dict", print_info=False)

    assert list(api["named_endpoints"]) == [ENDPOINT]
    assert api["unnamed_endpoints"] == {}
    endpoint = api["named_endpoints"][ENDPOINT]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == PARAMETERS
    assert [p["label"] for p in endpoint["parameters"]][:-2] == LABELS
    assert endpoint["parameters"][-2]["label"].startswith("Maximum new tokens (empty: ")
    assert endpoint["parameters"][-1]["label"] == "Masks (the segmenter's, over each box)"
    assert [r["label"] for r in endpoint["returns"]] == RETURNS
    for name in [p["label"] for p in endpoint["parameters"]] + [r["label"] for r in endpoint["returns"]]:
        assert not UNNAMED.match(name), name
    assert endpoint["description"]
    required = [p["parameter_name"] for p in endpoint["parameters"] if not p["parameter_has_default"]]
    assert required == ["image"]  # everything else has the page's own default


@pytest.mark.parametrize("internal", ["/_show_fields", "/lambda", "/lambda_1", "/_pick_corner", "/answer"])
def test_the_page_s_own_events_cannot_be_called_by_a_client(demo_client, internal):
    with pytest.raises(ValueError, match="Cannot find a function"):
        demo_client.predict("caption", api_name=internal)


def test_a_caption_through_the_client_answers_like_the_run_button(demo_client):
    grounded, html, download, raw, result = demo_client.predict(
        gradio_client.handle_file(str(EXAMPLE)), "caption", max_new_tokens=8, api_name=ENDPOINT,
    )

    assert {"task", "prompt", "text", "answer", "raw_text", "entities", "image_size", "generated_tokens"} <= set(result)
    assert result["task"] == "caption"
    assert result["raw_text"] == raw
    assert isinstance(result["text"], str) and isinstance(result["entities"], list)
    assert 1 <= result["generated_tokens"] <= 8
    with Image.open(EXAMPLE) as example:
        size = example.size
    assert result["image_size"] == list(size)
    assert 'class="kosmos-text"' in html
    assert isinstance(download, str)  # the file itself, no page update around it
    for path in (grounded, download):
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size == size


def test_omitted_inputs_take_the_page_s_defaults(demo_client):
    *_, result = demo_client.predict(gradio_client.handle_file(str(EXAMPLE)), api_name=ENDPOINT)

    assert result["task"] == "caption"  # the task's default; max_new_tokens empty: the service's default
    assert result["generated_tokens"] >= 1


def test_a_domain_error_comes_back_as_the_page_s_message(demo_client):
    with pytest.raises(gradio_client.exceptions.AppError, match="not a box"):
        demo_client.predict(gradio_client.handle_file(str(EXAMPLE)), "referring_generation", boxes="1,2,3",
                            max_new_tokens=8, api_name=ENDPOINT)


@pytest.mark.parametrize(("setting", "value", "label"), [
    (None, None, "Maximum new tokens (empty: the model's default)"),
    (32, 32, "Maximum new tokens (empty: 32)"),
])
def test_the_token_count_starts_at_the_setting_or_empty_for_the_model_s_default(engine, setting, value, label):
    from kosmos_serve.demo.page import build_page
    from kosmos_serve.server.metrics import Metrics
    from kosmos_serve.server.state import ServiceState

    settings = engine.settings.model_copy(update={"max_new_tokens": setting})
    page = build_page(ServiceState(ServerSettings(demo=True), settings, Metrics()), [])
    (number,) = [c for c in page.config["components"] if c["props"].get("elem_id") == "max-new-tokens"]
    assert number["props"].get("value") == value
    assert number["props"]["label"] == label


@pytest.mark.parametrize("segmenter", [None, "a-segmenter"])
def test_the_masks_box_shows_only_with_a_segmenter(engine, segmenter):
    from kosmos_serve.demo.page import build_page
    from kosmos_serve.server.metrics import Metrics
    from kosmos_serve.server.state import ServiceState

    settings = engine.settings.model_copy(update={"segmenter": segmenter})
    page = build_page(ServiceState(ServerSettings(demo=True), settings, Metrics()), [])
    (checkbox,) = [c for c in page.config["components"] if c["props"].get("elem_id") == "masks"]
    assert checkbox["props"]["visible"] is (segmenter is not None)


def test_masks_through_the_page_are_drawn(segmenting_engine, tmp_path):
    app = create_app(ServerSettings(demo=True), segmenting_engine.settings, engine=segmenting_engine)
    with pytest.MonkeyPatch.context() as env, serve_in_thread(app) as base_url:
        env.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.2")
        while httpx.get(f"{base_url}/ready").status_code != 200:
            time.sleep(0.05)
        client = gradio_client.Client(f"{base_url}/demo/", verbose=False, download_files=str(tmp_path))
        try:
            runs = [client.predict(gradio_client.handle_file(str(EXAMPLE)), "referring_generation",
                                   boxes="10,10,120,90", max_new_tokens=4, masks=masks, api_name=ENDPOINT)
                    for masks in (True, False)]
        finally:
            client.close()
    (drawn, *_, result), (plain, *_, plain_result) = runs
    assert len(result["entities"][0]["masks"]) == 1 and "masks" not in plain_result["entities"][0]
    with Image.open(drawn) as masked, Image.open(plain) as unmasked:
        assert masked.convert("RGB").tobytes() != unmasked.convert("RGB").tobytes()


def test_a_caller_cannot_make_the_page_read_a_server_file(demo_client):
    """The API's image names a path; only gradio's uploads and the page's examples may be opened."""
    server_file = Path(__file__).resolve().parents[2] / "docs" / "demo.png"  # an image, but never uploaded
    base = demo_client.src.rstrip("/")
    data = [{"path": str(server_file), "meta": {"_type": "gradio.FileData"}}, "caption", "", "", "", True, False,
            0.9, 0.7, 4]
    event = httpx.post(f"{base}/gradio_api/call/predict", json={"data": data}).json()["event_id"]
    answer = httpx.get(f"{base}/gradio_api/call/predict/{event}", timeout=30).text
    assert "event: error" in answer and "event: complete" not in answer, answer


def test_the_page_s_requests_count_under_the_demo_mount(demo_client):
    base = demo_client.src.rstrip("/")  # http://127.0.0.1:PORT/demo
    assert httpx.get(f"{base}/config").status_code == 200
    assert httpx.get(f"{base}/no-such-page-31337").status_code == 404
    metrics = httpx.get(f"{base.removesuffix('/demo')}/metrics").text
    routes = set(re.findall(r'^kosmos_requests_total\{route="([^"]+)"', metrics, re.MULTILINE))
    assert {"/demo/config", "unmatched"} <= routes
    assert not [route for route in routes if route == "/config" or route.startswith("/gradio_api") or "31337" in route]
