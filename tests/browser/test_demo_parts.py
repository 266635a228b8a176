"""The demo without a browser: what the form reads, what the page shows, the mount, and `kosmos-serve demo`."""

from __future__ import annotations

import re

import httpx
import pytest
from click.testing import CliRunner
from PIL import Image

import kosmos_serve.demo
from kosmos_serve.asgi import create_app
from kosmos_serve.cli import main
from kosmos_serve.config import ServerSettings
from kosmos_serve.demo.display import colour_hex, highlighted_html, save_png
from kosmos_serve.demo.form import TASK_FIELDS, generation_params, task_input
from kosmos_serve.drawing import entity_colours
from kosmos_serve.engine import GenerationParams, Result, Timings
from kosmos_serve.errors import InvalidBoxError
from kosmos_serve.grounding import Entity
from kosmos_serve.tasks import Task, TaskInput


def result(text: str, *entities: Entity) -> Result:
    return Result(Task.CAPTION, "<grounding> An image of", text, text, text, entities, text, (640, 480), 5, False,
                  Timings(0.1, 0.2))


def test_every_task_has_its_inputs_on_the_page():
    assert set(TASK_FIELDS) == set(Task)


def test_a_task_reads_only_the_inputs_it_shows():
    stale = {"prompt": "Why?", "phrases": "a dog", "boxes": "not a box", "grounding": False}
    assert task_input("caption", **stale) == TaskInput("caption")
    assert task_input("referring_generation", "", "", "60,150,260,350\n\n[1, 2, 3, 4]", False) == TaskInput(
        "referring_generation", boxes=((60, 150, 260, 350), (1, 2, 3, 4)))
    assert task_input("region_vqa", "What is the dog near?", " the dog \n", "1,2,3,4", False) == TaskInput(
        "region_vqa", "What is the dog near?", ("the dog",), ((1, 2, 3, 4),))
    assert task_input("raw", "<phrase> It</phrase> is", "", "", False).grounding is False


def test_a_mistyped_box_is_named_in_the_error():
    with pytest.raises(InvalidBoxError, match="'10,20,30' is not a box"):
        task_input("referring_generation", "", "", "1,2,3,4\n10,20,30", True)


def test_decoding_settings_default_to_the_services_token_count():
    assert generation_params(False, 0.9, 0.7, None) == GenerationParams()
    assert generation_params(True, 0.5, 1.2, 16.0) == GenerationParams(16, True, 1.2, 0.5)


def test_each_grounded_span_is_marked_in_its_entitys_colour():
    dog = Entity("a <dog>", (12, 19), ((0, 0, 0.5, 0.5),), ((0, 0, 320, 240),))
    ball = Entity("a ball", (22, 28), ((0.5, 0.5, 1, 1),), ((320, 240, 640, 480), (1, 2, 3, 4)))
    unnamed = Entity("<patch_index_0001>", (0, 0), ((0, 0, 1, 1),), ((0, 0, 640, 480),))
    shown = highlighted_html(result("An image of a <dog> & a ball.", dog, ball, unnamed))
    colours = entity_colours(["a <dog>", "a ball", "<patch_index_0001>"])
    text = re.search(r'<p class="kosmos-text">(.*?)</p>', shown).group(1)
    assert re.sub(r"<[^>]+>", "", text) == "An image of a &lt;dog&gt; &amp; a ball."  # escaped, nothing lost
    marks = re.findall(r'background-color:(#\w+);[^>]*>([^<]*)</mark>', text)
    assert marks == [(colour_hex(colours["a <dog>"]), "a &lt;dog&gt;"), (colour_hex(colours["a ball"]), "a ball")]
    assert "320,240,640,480  1,2,3,4" in shown and "&lt;patch_index_0001&gt;" in shown  # every entity listed
    assert "3 entities · 5 new tokens · 0.30 s" in shown


def test_the_download_folder_keeps_only_the_newest_images(tmp_path):
    folder = tmp_path / "downloads"
    paths = [save_png(Image.new("RGB", (4, 4), (shade, 0, 0)), folder, "kosmos2-caption", keep=3) for shade in range(5)]
    assert all(path.name.startswith("kosmos2-caption-") and path.suffix == ".png" for path in paths)
    assert sorted(folder.iterdir()) == sorted(paths[2:])


def test_the_service_mounts_the_demo_unless_told_not_to_or_run_in_several_processes():
    pytest.importorskip("gradio")
    assert "/demo" in _paths(create_app(ServerSettings(warmup=False)))
    assert "/demo" not in _paths(create_app(ServerSettings(warmup=False, demo=False)))
    assert "/demo" not in _paths(create_app(ServerSettings(warmup=False, num_api_servers=2)))


def test_the_service_runs_without_the_demo_when_gradio_is_missing(monkeypatch):
    monkeypatch.setattr(kosmos_serve.demo, "demo_available", lambda: False)
    assert "/demo" not in _paths(create_app(ServerSettings(warmup=False)))


def test_the_demo_command_without_gradio_names_the_install_command(monkeypatch):
    monkeypatch.setattr(kosmos_serve.demo, "demo_available", lambda: False)
    answer = CliRunner().invoke(main, ["demo"])
    assert answer.exit_code == 1
    assert answer.output == 'Error: The web demo needs gradio: pip install -e ".[demo]"\n'


def test_the_demo_command_refuses_a_missing_model_at_once(tmp_path):
    answer = CliRunner().invoke(main, ["demo", "--model", str(tmp_path / "nowhere")])
    assert answer.exit_code == 1 and "nowhere" in answer.output and "Traceback" not in answer.output


def test_the_demo_command_serves_the_page_and_the_api_on_one_model(tiny_model_dir, command_service):
    pytest.importorskip("gradio")
    args = ["demo", "--model", str(tiny_model_dir), "--device", "cpu", "--port", "{port}"]
    # KOSMOS_DEMO=false: the command turns the page on whatever the environment says
    with command_service(args, {"KOSMOS_DEMO": "false"}) as service:
        url = service.url
        page = httpx.get(f"{url}/demo/")
        info = httpx.get(f"{url}/info").json()
    output = service.output
    assert page.status_code == 200 and "Kosmos-2: grounded image understanding" in page.text
    assert info["model"] == str(tiny_model_dir)
    assert f"Kosmos-2 demo: {url}/demo/" in output


def _paths(app) -> set[str]:
    return {getattr(route, "path", None) for route in app.routes}
