"""Label Studio export: tasks checked with label-studio-sdk's LabelInterface (the validation the Label Studio
server, 1.23.2 data_import/api.py, runs on imported predictions), scores and model versions as the ML backend
writes them, and a labeling config that the backend reads back to the same phrases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from records_for_export import (
    PARK_BENCH_FLAT,
    PARK_TREE,
    PARK_TRUCK,
    STREET_CARS,
    STREET_DOG,
    entity,
    export,
    invoke,
    make_records,
    write_records,
)

LABEL_STUDIO_SDK = "label-studio-sdk==2.1.2"  # the version label-studio 1.23.2 pins, and validates imports with
# What its label_interface imports (the whole SDK's requirements, opencv and nltk among them, take 5x the space and
# 2-3x the time): installed with the SDK itself --no-deps.
LABEL_INTERFACE_NEEDS = ["pydantic>=2", "lxml>=6.1", "xmljson==0.2.1", "jsonschema", "jsf>=0.11.2,<0.12",
                         "pyjwt>=2.13,<2.14", "appdirs"]


@pytest.fixture
def records(tmp_path):
    return make_records(tmp_path)


@pytest.fixture
def records_file(tmp_path, records):
    return write_records(tmp_path / "results.jsonl", records)


def test_label_studio_tasks_have_the_exact_shape(records_file):
    tasks, _summary = export(records_file, "label-studio", "--image-root", "http://files.local/my photos/")

    def region(task, number, label, box, width, height, score):
        x1, y1, x2, y2 = box
        return {"id": f"kosmos-{task}-{number}", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
                "original_width": width, "original_height": height, "image_rotation": 0,
                "value": {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
                          "height": 100 * (y2 - y1) / height, "rotation": 0, "rectanglelabels": [label]},
                "score": score}

    assert tasks == [
        {"data": {"image": "http://files.local/my photos/a/street.png"},
         "predictions": [{"result": [
             region(1, 1, "car", STREET_CARS[0], 200, 100, 0.9), region(1, 2, "car", STREET_CARS[1], 200, 100, 0.45),
             region(1, 3, "a dog", STREET_DOG, 200, 100, 0.6)],
             "score": (0.9 + 0.45 + 0.6) / 3, "model_version": "kosmos-2:demo"}]},
        {"data": {"image": "http://files.local/my photos/b/park.png"},
         "predictions": [{"result": [region(2, 1, "a tree", PARK_TREE, 300, 150, 0.8),
                                     region(2, 2, "car", PARK_TRUCK, 300, 150, 0.75)],
                          "score": (0.8 + 0.75) / 2, "model_version": "kosmos-2:demo"}]},
    ]
    assert tasks[0]["predictions"][0]["result"][0]["value"] == {
        "x": 5.0, "y": 20.0, "width": 25.0, "height": 60.0, "rotation": 0, "rectanglelabels": ["car"]}


def test_label_studio_predictions_score_and_name_the_model_as_the_ml_backend_does(tmp_path, records):
    from kosmos_serve.exports.label_studio import model_version
    from kosmos_serve.server.label_studio.protocol import prediction as backend_prediction

    records[0]["quantize"] = "int8"
    records[2]["entities"] = [entity("a bench", [PARK_BENCH_FLAT], 300, 150, [0.5])]  # nothing left to label
    tasks, _ = export(write_records(tmp_path / "results.jsonl", records), "label-studio")
    [street], [park] = (task["predictions"] for task in tasks)
    assert street == backend_prediction(street["result"], model_version("demo", "int8"))
    assert street["model_version"] == "kosmos-2:demo+int8" and street["score"] == pytest.approx(0.65)
    assert park == backend_prediction([], model_version("demo")) == {"result": [], "score": 0.0,
                                                                      "model_version": "kosmos-2:demo"}


def test_label_studio_defaults_to_its_local_files_url_quoted(tmp_path, records, monkeypatch):
    records[2]["resolved"] = str(tmp_path / "photos" / "b" / "park & pond #1.png")
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    monkeypatch.delenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", raising=False)
    tasks, _ = export(path, "label-studio")
    assert [task["data"]["image"] for task in tasks] == [
        "/data/local-files/?d=a/street.png", "/data/local-files/?d=b/park%20%26%20pond%20%231.png"]

    # relative to Label Studio's document root, which must hold the images' folder (it cannot be that folder)
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    tasks, summary = export(path, "label-studio")
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=photos/a/street.png"
    assert f"image names relative to {tmp_path};" in summary
    tasks, _ = export(path, "label-studio", "--image-root", "https://example.com/")  # not local files: not the root
    assert tasks[0]["data"]["image"] == "https://example.com/a/street.png"


@pytest.fixture(scope="session")
def label_studio_python():
    """A Python with label-studio-sdk, in its own virtual environment (its numpy pin clashes with ours).

    Built once under the system's temporary folder and reused (15-30 s and 0.1 GB the first time).
    """
    home = Path(tempfile.gettempdir()) / f"kosmos-serve-{LABEL_STUDIO_SDK.replace('==', '-')}-label-interface"
    python = home / "bin" / "python"
    if not (home / "ready").exists():
        building = Path(tempfile.mkdtemp(prefix=home.name + ".building-", dir=home.parent))
        try:
            subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, capture_output=True)
            pip = [str(building / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            subprocess.run([*pip, "--no-deps", LABEL_STUDIO_SDK], check=True, capture_output=True, timeout=600)
            subprocess.run([*pip, *LABEL_INTERFACE_NEEDS], check=True, capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as error:
            shutil.rmtree(building, ignore_errors=True)
            output = getattr(error, "stderr", b"") or b""
            reason = f"cannot install {LABEL_STUDIO_SDK}: {output.decode(errors='replace')[-500:] or error}"
            (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
        (building / "ready").touch()
        try:
            building.rename(home)
        except OSError:  # another run finished first: use that one
            shutil.rmtree(building, ignore_errors=True)
    return python


VALIDATE = """
import json, sys
from label_studio_sdk.label_interface import LabelInterface

def errors(config, tasks):
    interface = LabelInterface(config)
    interface.validate()
    found = []
    for number, task in enumerate(tasks):
        for obj in interface.objects:  # what the server asks of task data: every $variable of the config
            if obj.value_is_variable and task["data"].get(obj.value_name) is None:
                found.append(f"task {number}: no data.{obj.value_name}")
        for prediction in task["predictions"]:  # the server's check of imported predictions (data_import/api.py)
            found += [f"task {number}: {e}" for e in interface.validate_prediction(prediction, return_errors=True)]
    return found

print(json.dumps([errors(config, tasks) for config, tasks in json.load(sys.stdin)]))
"""


def label_studio_errors(python, *cases):
    """Label Studio's errors for each (labeling config, tasks) case, from one run of its SDK."""
    run = subprocess.run([str(python), "-c", VALIDATE], input=json.dumps(cases), capture_output=True, text=True,
                         timeout=120, cwd=tempfile.gettempdir(), check=False)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_label_studio_tasks_pass_label_studios_own_validation(records_file, label_studio_python):
    tasks, _ = export(records_file, "label-studio", "--from-name", "objects", "--to-name", "photo",
                      "--label-config", records_file.parent / "config.xml")
    config = (records_file.parent / "config.xml").read_text()
    assert '<Image name="photo" value="$image"/>' in config and '<RectangleLabels name="objects"' in config
    default_names, _ = export(records_file, "label-studio")
    no_tree = config.replace('<Label value="a tree" predicted_values="a tree"/>', "")
    assert no_tree != config
    ours, without_a_label, other_names = label_studio_errors(
        label_studio_python, (config, tasks), (no_tree, tasks), (config, default_names))
    assert ours == []
    # the validator does check: a label the config lacks and a control name it lacks are refused
    assert len(without_a_label) == 1 and "valid labels" in without_a_label[0]
    assert "'from_name' 'label' not found" in other_names[0]


def test_the_label_config_gives_the_ml_backend_each_labels_phrases(records_file):
    from kosmos_serve.server.label_studio.config import LabelSpec, detection_plan, parse_labeling_config

    _, summary = export(records_file, "label-studio", "--label-config", records_file.parent / "config.xml")
    assert summary.startswith(f"wrote {records_file.parent / 'label-studio.json'} (label-studio) and its labeling "
                              f"config {records_file.parent / 'config.xml'}: 2 images, ")
    config = parse_labeling_config((records_file.parent / "config.xml").read_text())
    car, dog, tree = LabelSpec("car", ("a red car", "a truck")), LabelSpec("a dog", ("a dog",)), LabelSpec(
        "a tree", ("a tree",))
    assert (config.from_name, config.to_name, config.image_field) == ("label", "image", "image")
    assert config.labels == (dog, tree, car)
    assert detection_plan(config, None) == {"a dog": dog, "a tree": tree, "a red car": car, "a truck": car}


def test_a_phrase_with_a_comma_is_its_labels_value_or_refused(tmp_path, records):
    from kosmos_serve.server.label_studio.config import parse_labeling_config

    records[0]["entities"][1]["phrase"] = "a dog, asleep"  # its own label: the backend grounds the value itself
    export(write_records(tmp_path / "results.jsonl", records), "label-studio", "--label-config", tmp_path / "c.xml")
    config_text = (tmp_path / "c.xml").read_text()
    assert '<Label value="a dog, asleep"/>' in config_text
    labels = parse_labeling_config(config_text).labels
    assert ("a dog, asleep", ("a dog, asleep",)) in [(label.value, label.phrases) for label in labels]

    records[0]["entities"][0]["phrase"] = "a car, red"  # one of the class car's phrases: predicted_values cannot
    path = write_records(tmp_path / "results.jsonl", records)
    result = invoke(path, "--format", "label-studio", "--out", tmp_path / "t.json", "--label-config",
                    tmp_path / "other.xml")
    assert result.exit_code == 1
    assert result.output.startswith("Error: --label-config: the phrase 'a car, red' of label 'car' holds a comma")
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "other.xml").exists()
