"""The Label Studio ML backend on a Kosmos-2.5: a project with Label Studio's OCR template gets each page's lines, every
line a rectangle with the config's label and its text in the per-region `<TextArea>`, equal to the engine's own `ocr`
reading; configs a model cannot fill are a 422 in the backend's error shape.

A random model writes no lines, so the engine is made to write forced_reading.READING: only its choice of tokens is replaced.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import tempfile

import httpx
import pytest
from forced_reading import force_reading
from local_server import serve_in_thread
from PIL import Image, ImageDraw
from test_label_studio import assert_label_studio_error

from kosmos_serve.asgi import create_app
from kosmos_serve.config import ServerSettings
from kosmos_serve.engine import GenerationParams, Request
from kosmos_serve.exports.label_studio import label_studio_config, model_version
from kosmos_serve.tasks import Task, TaskInput

# Label Studio's OCR template (its Labels, Rectangle, Polygon and per-region TextArea), "Text" not its first label
OCR_TEMPLATE = """<View>
  <Image name="page" value="$ocr"/>
  <Labels name="kind" toName="page">
    <Label value="Handwriting" background="blue"/>
    <Label value="Text" background="green"/>
  </Labels>
  <Rectangle name="bbox" toName="page" strokeWidth="3"/>
  <Polygon name="poly" toName="page" strokeWidth="3"/>
  <TextArea name="words" toName="page" editable="true" perRegion="true" required="true" maxSubmissions="1" rows="5"
            placeholder="Recognized Text" displayMode="region-list"/>
</View>"""
# A RectangleLabels whose only label is not LINE_LABEL: the lines carry it
PRINTED_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Printed"/></RectangleLabels>
  <TextArea name="transcription" toName="image" perRegion="true"/>
</View>"""
DETECTION_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Circle" hint="the blue circle"/></RectangleLabels>
</View>"""


# Label Studio's own check of imported predictions (its data_import/api.py), in its SDK: the errors of each case
VALIDATE = """
import json, sys
from label_studio_sdk.label_interface import LabelInterface

print(json.dumps([LabelInterface(config).validate_prediction(prediction, return_errors=True)
                  for config, prediction in json.load(sys.stdin)]))
"""


def predict(backend: str, config: str, data: dict) -> httpx.Response:
    """`/predict` for one task, as Label Studio sends it."""
    return httpx.post(f"{backend}/predict", json={
        "tasks": [{"id": 7, "data": data}], "label_config": config, "project": "3.1796147424",
        "params": {"login": None, "password": None, "context": None}}, timeout=120)


@pytest.fixture(scope="module")
def page() -> Image.Image:
    image = Image.new("RGB", (500, 160), "white")
    ImageDraw.Draw(image).text((20, 20), "RECEIPT 0008", fill="black")
    return image


@pytest.fixture(scope="module")
def page_uri(page) -> str:
    buffer = io.BytesIO()
    page.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def forced_reading(kosmos25_engine, monkeypatch):
    """The engine writes forced_reading.READING, then `</s>`: only its choice of tokens is replaced."""
    force_reading(kosmos25_engine, monkeypatch)


@pytest.fixture(scope="module")
def kosmos25_backend(kosmos25_engine):
    """The backend's base URL on the tiny Kosmos-2.5."""
    app = create_app(ServerSettings(demo=False), kosmos25_engine.settings, engine=kosmos25_engine)
    with serve_in_thread(app) as url:
        yield f"{url}/label-studio"


@pytest.mark.parametrize(("config", "field", "names", "label"), [
    (OCR_TEMPLATE, "ocr", ("kind", "page", "words"), "Text"),
    (PRINTED_CONFIG, "image", ("label", "image", "transcription"), "Printed"),
    (label_studio_config({}, transcribed=True), "image", ("label", "image", "transcription"), "Text"),  # the export's
])
def test_each_line_read_is_a_labelled_rectangle_and_its_text_as_the_engine_reads_the_page(
        kosmos25_engine, kosmos25_backend, forced_reading, page, page_uri, config, field, names, label):
    from_name, to_name, transcription = names
    (read,) = kosmos25_engine.run([Request(page, TaskInput(Task.OCR), GenerationParams())])
    assert [line.text for line in read.lines] == ["RECEIPT 0008", "Total 50,000"]

    response = predict(kosmos25_backend, config, {field: page_uri})
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["results"]
    regions = prediction["result"]
    rectangles, texts = regions[0::2], regions[1::2]
    assert len(rectangles) == len(texts) == len(read.lines)
    for line, rectangle, text in zip(read.lines, rectangles, texts, strict=True):
        x1, y1, x2, y2 = line.box
        place = {"x": 100 * x1 / 500, "y": 100 * y1 / 160, "width": 100 * (x2 - x1) / 500,
                 "height": 100 * (y2 - y1) / 160, "rotation": 0}
        assert rectangle["type"] == "rectanglelabels" and text["type"] == "textarea"
        assert rectangle["id"] == text["id"] and rectangle["to_name"] == text["to_name"] == to_name
        assert (rectangle["from_name"], text["from_name"]) == (from_name, transcription)
        assert rectangle["value"] == {**place, "rectanglelabels": [label]}
        assert text["value"] == {**place, "text": [line.text]}
        assert rectangle["score"] == text["score"] == line.score > 0
        assert (rectangle["original_width"], rectangle["original_height"]) == (500, 160)
    assert len({rectangle["id"] for rectangle in rectangles}) == len(rectangles)
    assert prediction["score"] == pytest.approx(sum(line.score for line in read.lines) / len(read.lines), abs=1e-4)
    assert prediction["model_version"] == model_version(kosmos25_engine.settings.model)


def test_the_lines_pass_label_studios_own_validation(kosmos25_backend, forced_reading, page_uri, label_studio_python):
    ocr_template = predict(kosmos25_backend, OCR_TEMPLATE, {"ocr": page_uri}).json()["results"][0]
    printed = predict(kosmos25_backend, PRINTED_CONFIG, {"image": page_uri}).json()["results"][0]
    assert len(ocr_template["result"]) == len(printed["result"]) == 4
    mislabelled = json.loads(json.dumps(printed).replace('"Printed"', '"Handwriting"'))
    cases = [(OCR_TEMPLATE, ocr_template), (PRINTED_CONFIG, printed), (PRINTED_CONFIG, mislabelled)]
    run = subprocess.run([label_studio_python, "-c", VALIDATE], input=json.dumps(cases), capture_output=True,
                         text=True, timeout=120, cwd=tempfile.gettempdir(), check=False)
    assert run.returncode == 0, run.stderr
    ours, ours_printed, refused = json.loads(run.stdout)
    assert ours == ours_printed == []
    assert len(refused) == 2 and all("valid labels: ['Printed']" in error for error in refused)  # it does check


def test_setup_takes_the_ocr_template_and_answers_the_exports_model_version(kosmos25_engine, kosmos25_backend):
    response = httpx.post(f"{kosmos25_backend}/setup", json={"project": "3.1796147424", "schema": OCR_TEMPLATE})
    assert response.status_code == 200, response.text
    assert response.json() == {"model_version": model_version(kosmos25_engine.settings.model)}


def test_a_kosmos25_with_a_config_without_a_per_region_text_area_is_a_422(kosmos25_backend, page_uri):
    without_text_area = OCR_TEMPLATE.replace('perRegion="true"', 'perRegion="false"')
    for config in (DETECTION_CONFIG, without_text_area):
        predicted = httpx.post(f"{kosmos25_backend}/predict", json={
            "tasks": [{"id": 1, "data": {"image": page_uri, "ocr": page_uri}}], "label_config": config}, timeout=60)
        assert_label_studio_error(predicted, 422, "no per-region <TextArea>", "Kosmos-2.5")
        assert_label_studio_error(httpx.post(f"{kosmos25_backend}/setup", json={"schema": config}), 422,
                                  "no per-region <TextArea>")


def test_a_kosmos2_with_the_ocr_template_is_a_422(engine, page_uri):
    app = create_app(ServerSettings(demo=False), engine.settings, engine=engine)
    with serve_in_thread(app) as url:
        predicted = httpx.post(f"{url}/label-studio/predict", json={
            "tasks": [{"id": 1, "data": {"ocr": page_uri}}], "label_config": OCR_TEMPLATE}, timeout=60)
        set_up = httpx.post(f"{url}/label-studio/setup", json={"schema": OCR_TEMPLATE})
    for response in (predicted, set_up):
        assert_label_studio_error(response, 422, "for reading text", "Kosmos-2 model", "Kosmos-2.5")


def test_the_configs_min_score_leaves_out_the_lines_scored_under_it(kosmos25_engine, kosmos25_backend, forced_reading,
                                                                    page, page_uri):
    (read,) = kosmos25_engine.run([Request(page, TaskInput(Task.OCR), GenerationParams())])
    threshold = max(line.score for line in read.lines)  # only the surest line stays
    control = f'<Number name="min_score" toName="page" min="0" max="1" defaultValue="{threshold}"/>\n</View>'
    response = predict(kosmos25_backend, OCR_TEMPLATE.replace("</View>", control), {"ocr": page_uri})
    assert response.status_code == 200, response.text
    texts = [region["value"]["text"] for region in response.json()["results"][0]["result"] if region["type"] == "textarea"]
    assert texts == [[line.text] for line in read.lines if line.score >= threshold]
    assert 0 < len(texts) < len(read.lines)
