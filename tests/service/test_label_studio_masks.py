"""The Label Studio ML backend's mask regions: a project whose labeling config has `<BrushLabels>` or
`<PolygonLabels>` gets each box's mask, checked by Label Studio's own SDK (its check of predictions and its
brush decoder), in its own environment (tests/tool_environments.py).

The protocol-level tests build results by hand from real masks (pycocotools' encoding, as the engine's); the
service tests run the backend with a segmenter (`EngineSettings(segmenter=...)`) or without one.
"""

from __future__ import annotations

import base64
import json
import subprocess
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from local_server import serve_in_thread
from pycocotools import mask as coco_mask

from kosmos_serve.asgi import create_app
from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.engine import Engine, Result, Timings
from kosmos_serve.exports.label_studio import prediction
from kosmos_serve.exports.masks import brush_rle, mask_pixels, outline
from kosmos_serve.grounding import Entity, Mask
from kosmos_serve.server.label_studio.config import detection_plan, parse_labeling_config
from kosmos_serve.server.label_studio.protocol import regions
from kosmos_serve.tasks import Task

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools'

REPO = Path(__file__).resolve().parents[2]
SCENE = REPO / "examples" / "scene-four-shapes.png"  # 229 x 195
WIDTH, HEIGHT = 229, 195
SCENE_OBJECTS = {"the blue circle": [134, 0, 221, 87], "the yellow cross": [133, 98, 183, 148]}


def config(control: str) -> str:
    return f"""<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1"/>
  <{control} name="label" toName="image">
    <Label value="Circle" hint="the blue circle"/>
    <Label value="Cross" hint="the yellow cross"/>
  </{control}>
</View>"""


def disc(box) -> np.ndarray:
    """The ellipse inscribed in a pixel box, as an H x W boolean mask of the scene."""
    x1, y1, x2, y2 = box
    rows, columns = np.mgrid[:HEIGHT, :WIDTH] + 0.5
    return ((columns - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2 + ((rows - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2 <= 1


def encode(pixels: np.ndarray) -> Mask:
    encoded = coco_mask.encode(np.asfortranarray(pixels.astype(np.uint8)))
    return Mask((HEIGHT, WIDTH), encoded["counts"].decode("ascii"))


def result_with_masks(masks: dict[str, np.ndarray]) -> Result:
    """A detection result for the scene: each phrase its box (as given), its score, and its mask."""
    entities, start = [], 0
    for number, (phrase, pixels) in enumerate(masks.items()):
        x1, y1, x2, y2 = SCENE_OBJECTS.get(phrase, (0, 0, 10, 10))
        entities.append(Entity(phrase, (start, start + len(phrase)), ((x1 / WIDTH, y1 / HEIGHT, x2 / WIDTH, y2 / HEIGHT),),
                               ((x1, y1, x2, y2),), (0.9 - 0.2 * number,), (encode(pixels),), (0.95,)))
        start += len(phrase) + 2
    return Result(Task.DETECTION, "", ", ".join(masks), "", "", tuple(entities), "", (WIDTH, HEIGHT), 9, False,
                  Timings())


# Runs in Label Studio's environment: each (config, prediction) checked as Label Studio checks predictions, and
# each brush region decoded by its converter (the alpha channel of the RGBA bytes).
LABEL_STUDIO_READS = """
import json, sys
import numpy as np
from label_studio_sdk.converter import brush
from label_studio_sdk.label_interface import LabelInterface

answer = []
for config, prediction in json.load(sys.stdin):
    errors = LabelInterface(config).validate_prediction(prediction, return_errors=True)
    decoded = [np.reshape(brush.decode_rle(region["value"]["rle"]),
                          [region["original_height"], region["original_width"], 4])[:, :, 3].tolist()
               for region in prediction["result"] if region["type"] == "brushlabels"]
    answer.append({"errors": errors, "decoded": decoded})
print(json.dumps(answer))
"""


def label_studio_reads(python: str, *cases) -> list[dict]:
    run = subprocess.run([python, "-c", LABEL_STUDIO_READS], input=json.dumps(cases), capture_output=True, text=True,
                         timeout=300, cwd=tempfile.gettempdir(), check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


# ------------------------------------------------------------------------------------------------ the protocol


def test_brush_and_polygon_configs_ask_for_masks():
    brush, polygon, boxes = (parse_labeling_config(config(tag)) for tag in ("BrushLabels", "PolygonLabels",
                                                                             "RectangleLabels"))
    assert (brush.region_type, brush.masks) == ("brushlabels", True)
    assert (polygon.region_type, polygon.masks) == ("polygonlabels", True)
    assert (boxes.region_type, boxes.masks) == ("rectanglelabels", False)
    assert [label.phrases for label in brush.labels] == [("the blue circle",), ("the yellow cross",)]
    both = config("RectangleLabels").replace("</View>", '<BrushLabels name="mask" toName="image">'
                                                        '<Label value="Circle"/></BrushLabels></View>')
    assert parse_labeling_config(both).region_type == "rectanglelabels"  # the first control on the image counts


def test_masks_become_brush_regions_label_studio_decodes_and_polygons_it_accepts(label_studio_python):
    circle, cross = disc(SCENE_OBJECTS["the blue circle"]), disc(SCENE_OBJECTS["the yellow cross"])
    result = result_with_masks({"the blue circle": circle, "the yellow cross": cross})
    answers = {}
    for tag in ("BrushLabels", "PolygonLabels"):
        parsed = parse_labeling_config(config(tag))
        answers[tag] = prediction(regions(result, parsed, detection_plan(parsed, None)), "kosmos-2:demo")
    brush, polygon = answers["BrushLabels"], answers["PolygonLabels"]

    brush_read, polygon_read, wrong_control = label_studio_reads(
        label_studio_python, (config("BrushLabels"), brush), (config("PolygonLabels"), polygon),
        (config("RectangleLabels"), brush))
    assert brush_read["errors"] == [] and polygon_read["errors"] == []
    assert wrong_control["errors"]  # the check does check: brush regions do not fit a RectangleLabels project
    assert brush_read["decoded"] == [(circle * 255).astype(int).tolist(), (cross * 255).astype(int).tolist()]

    first = brush["result"][0]
    assert {key: first[key] for key in ("from_name", "to_name", "type", "original_width", "original_height",
                                        "image_rotation", "score")} == {
        "from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": WIDTH,
        "original_height": HEIGHT, "image_rotation": 0, "score": 0.9}
    assert first["value"] == {"format": "rle", "rle": brush_rle(circle), "brushlabels": ["Circle"]}
    assert brush["score"] == round((0.9 + 0.7) / 2, 4) and brush["model_version"] == "kosmos-2:demo"

    ring = polygon["result"][1]["value"]
    assert ring["polygonlabels"] == ["Cross"] and ring["closed"] is True
    assert np.allclose(np.array(ring["points"]) * [WIDTH / 100, HEIGHT / 100], outline(cross))
    assert [r["score"] for r in polygon["result"]] == [r["score"] for r in brush["result"]]


def test_a_typed_phrase_no_label_fits_comes_unlabelled_and_an_empty_mask_is_left_out():
    parsed = parse_labeling_config(config("BrushLabels"))
    context = {"result": [{"from_name": "prompt", "type": "textarea", "value": {"text": ["a star, the blue circle"]}}]}
    result = result_with_masks({"a star": disc((20, 20, 60, 60)), "the blue circle": np.zeros((HEIGHT, WIDTH), bool)})
    [star] = regions(result, parsed, detection_plan(parsed, context))
    assert star["value"]["brushlabels"] == [] and star["meta"] == {"text": ["a star"]}
    assert (mask_pixels(result.entities[0].masks[0]) == disc((20, 20, 60, 60))).all()


def test_a_rectangle_config_answers_boxes_even_when_the_result_has_masks():
    parsed = parse_labeling_config(config("RectangleLabels"))
    result = result_with_masks({"the blue circle": disc(SCENE_OBJECTS["the blue circle"])})
    [region] = regions(result, parsed, detection_plan(parsed, None))
    assert region["type"] == "rectanglelabels" and region["value"]["rectanglelabels"] == ["Circle"]


# ------------------------------------------------------------------------------------------------ the service

HAS_SEGMENTER_SETTING = "segmenter" in EngineSettings.model_fields
NEEDS_SEGMENTER_SETTING = pytest.mark.skipif(
    not HAS_SEGMENTER_SETTING, reason="the engine's --segmenter (EngineSettings.segmenter) comes with the masks branch")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def predict_body(control: str) -> dict:
    return {"tasks": [{"id": 16, "data": {"image": data_uri(SCENE)}}], "project": "5.1796147424",
            "label_config": config(control), "params": {"login": None, "password": None, "context": None}}


def serve(engine: Engine):
    return serve_in_thread(create_app(ServerSettings(demo=False), engine.settings, engine=engine))


@NEEDS_SEGMENTER_SETTING
def test_without_a_segmenter_a_brush_project_is_told_how_to_load_one():
    engine = Engine(EngineSettings(model="demo", device="cpu"))
    with serve(engine) as base_url:
        answer = httpx.post(f"{base_url}/label-studio/predict", json=predict_body("BrushLabels"), timeout=120)
        boxes = httpx.post(f"{base_url}/label-studio/predict", json=predict_body("RectangleLabels"), timeout=120)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert set(body) == {"status", "detail", "code"} and body["status"] == 422  # the ML backend's error shape
    assert "--segmenter" in body["detail"] or "KOSMOS_SEGMENTER" in body["detail"], body["detail"]
    assert boxes.status_code == 200 and boxes.json()["results"][0]["result"]  # boxes need no segmenter


@pytest.fixture(scope="module")
def segmenting_service():
    """The service on the demo model and the demo segmenter; yields its base URL."""
    engine = Engine(EngineSettings(model="demo", device="cpu", segmenter="demo"))
    with serve(engine) as base_url:
        yield base_url


@NEEDS_SEGMENTER_SETTING
@pytest.mark.parametrize("control", ["BrushLabels", "PolygonLabels"])
def test_with_a_segmenter_the_regions_are_the_masks_v1_generate_gives(segmenting_service, control):
    reference = httpx.post(f"{segmenting_service}/v1/generate", timeout=120, json={
        "image": data_uri(SCENE), "task": "detection", "phrases": ["the blue circle", "the yellow cross"],
        "masks": True}).json()
    answer = httpx.post(f"{segmenting_service}/label-studio/predict", json=predict_body(control), timeout=120)
    assert answer.status_code == 200, answer.text
    got = answer.json()["results"][0]["result"]
    boxes = [(pixels, score) for entity in reference["entities"]
             for pixels, score in zip(map(mask_pixels, entity["masks"]), entity["scores"], strict=True) if pixels.any()]
    if control == "BrushLabels":
        assert [region["value"]["rle"] for region in got] == [brush_rle(pixels) for pixels, _ in boxes]
    else:
        assert [region["value"]["points"] for region in got] == [
            [[100 * x / WIDTH, 100 * y / HEIGHT] for x, y in outline(pixels)] for pixels, _ in boxes]
    assert [region["score"] for region in got] == [score for _, score in boxes]
    assert {region["type"] for region in got} == {control.lower()}
