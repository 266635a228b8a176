"""Exports of annotation records, each checked with the real tool that reads it.

COCO with pycocotools (and supervision's COCO loader), supervision.Detections with the real
supervision, Label Studio tasks with label-studio-sdk's LabelInterface: the validation the Label
Studio server (1.23.2, data_import/api.py) runs on imported predictions. The records are written by
hand here, so these tests do not depend on `kosmos-serve annotate`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from kosmos_serve.cli import main
from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.exports import MissingExtraError, to_detections

pytestmark = pytest.mark.filterwarnings("ignore:OpenCV:UserWarning")  # supervision falls back to NumPy

LABEL_STUDIO_SDK = "label-studio-sdk==2.1.2"  # the version label-studio 1.23.2 pins, and validates imports with
# What its label_interface imports (the whole SDK's requirements, opencv and nltk among them, take 5x the space and
# 2-3x the time): installed with the SDK itself --no-deps.
LABEL_INTERFACE_NEEDS = ["pydantic>=2", "lxml>=6.1", "xmljson==0.2.1", "jsonschema", "jsf>=0.11.2,<0.12",
                         "pyjwt>=2.13,<2.14", "appdirs"]

# Two images in two folders, one image that failed; boxes in pixels of each image.
STREET = ("photos/a/street.png", 200, 100)
PARK = ("photos/b/park.png", 300, 150)
BROKEN = "photos/broken.png"
STREET_CARS = [[10, 20, 60, 80], [100, 10, 150, 50]]  # one entity, two boxes, each its own score, an ontology class
STREET_CAR_SCORES = [0.9, 0.45]
STREET_DOG_REVERSED = [190, 90, 120, 40]  # the lower-right corner came first
STREET_DOG = (120, 40, 190, 90)
STREET_DOG_SCORE = 0.6
PARK_TRUCK = [200, 50, 280, 120]  # another phrase of the class car
PARK_TRUCK_SCORE = 0.75
PARK_TREE = [30, 15, 90, 135]
PARK_TREE_SCORE = 0.8
PARK_BENCH_FLAT = [50, 60, 50, 90]  # zero width: left out


def entity(phrase, pixel_boxes, width, height, scores, class_name=None):
    """An entity as annotate writes it: normalised boxes beside the pixel ones, a score per box."""
    boxes = [[x1 / width, y1 / height, x2 / width, y2 / height] for x1, y1, x2, y2 in pixel_boxes]
    return {"phrase": phrase, "class": class_name, "span": [0, len(phrase)], "boxes": boxes,
            "pixel_boxes": pixel_boxes, "scores": scores}


def annotated(root, path, width, height, entities):
    return {"path": path, "resolved": str(root / path), "sha256": "ab" * 32, "width": width, "height": height,
            "task": "detection", "prompt": "<grounding><phrase> a red car</phrase>", "text": "", "answer": "",
            "raw_text": "", "entities": entities, "markdown": "", "generated_tokens": 9, "model": "demo",
            "quantize": "none", "min_score": 0.3, "kosmos_serve_version": "0.1.0"}


@pytest.fixture
def records(tmp_path):
    """The records (annotated, failed, annotated) and their real image files under tmp_path/photos."""
    street = annotated(tmp_path, *STREET, [
        entity("a red car", STREET_CARS, 200, 100, STREET_CAR_SCORES, class_name="car"),
        entity("a dog", [STREET_DOG_REVERSED], 200, 100, [STREET_DOG_SCORE]),
    ])
    failed = {"path": BROKEN, "resolved": str(tmp_path / BROKEN), "sha256": None, "width": None, "height": None,
              "task": "detection", "error": {"code": "invalid_image", "message": "not an image"}, "model": "demo",
              "kosmos_serve_version": "0.1.0"}
    park = annotated(tmp_path, *PARK, [
        entity("a tree", [PARK_TREE], 300, 150, [PARK_TREE_SCORE]),
        entity("a truck", [PARK_TRUCK], 300, 150, [PARK_TRUCK_SCORE], class_name="car"),
        entity("a bench", [PARK_BENCH_FLAT], 300, 150, [0.5]),
    ])
    for path, width, height in (STREET, PARK):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), "white").save(tmp_path / path)
    return [street, failed, park]


def write_records(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def records_file(tmp_path, records):
    return write_records(tmp_path / "results.jsonl", records)


def invoke(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)], catch_exceptions=False)


def export(records_file, format_name, *options):
    out = records_file.parent / f"{format_name}.json"
    result = invoke(records_file, "--format", format_name, "--out", out, *options)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output.strip()


# --- COCO -------------------------------------------------------------------------------------------------------


def test_coco_export_loads_in_pycocotools_with_its_boxes(records_file, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset, summary = export(records_file, "coco")
    coco = COCO(str(records_file.parent / "coco.json"))  # the file as a dataset
    assert len(coco.getImgIds()) == 2 and len(coco.getAnnIds()) == 5 and len(coco.getCatIds()) == 3
    assert [image["file_name"] for image in coco.loadImgs(coco.getImgIds())] == ["a/street.png", "b/park.png"]
    names = {category["id"]: category["name"] for category in coco.loadCats(coco.getCatIds())}
    assert sorted(names.values()) == ["a dog", "a tree", "car"]  # the ontology's class, else the phrase
    boxes = {(ann["image_id"], names[ann["category_id"]], tuple(ann["bbox"]), ann["area"], ann["score"])
             for ann in coco.loadAnns(coco.getAnnIds())}
    assert boxes == {(1, "car", (10, 20, 50, 60), 3000, 0.9), (1, "car", (100, 10, 50, 40), 2000, 0.45),
                     (1, "a dog", (120, 40, 70, 50), 3500, 0.6), (2, "a tree", (30, 15, 60, 120), 7200, 0.8),
                     (2, "car", (200, 50, 80, 70), 5600, 0.75)}
    assert all(ann["segmentation"] == [] for ann in dataset["annotations"])
    assert dataset["info"]["version"] and dataset["licenses"] == []

    # the same file's annotations as detection results, against the file as ground truth
    detections = coco.loadRes(copy.deepcopy(dataset["annotations"]))
    assert [(ann["bbox"], ann["score"]) for ann in detections.loadAnns(detections.getAnnIds())] == [
        (ann["bbox"], ann["score"]) for ann in dataset["annotations"]]
    evaluation = COCOeval(coco, detections, "bbox")
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]: every box found, exactly
    capsys.readouterr()
    assert summary == (f"wrote {records_file.parent / 'coco.json'} (coco): 2 images, 5 boxes, image names relative "
                       f"to {records_file.parent / 'photos'}; left out 1 failed record (invalid_image 1); put 1 box "
                       "with reversed corners in order; left out 1 box of zero width or height")


@pytest.mark.parametrize("false_score, average_precision", [(0.2, 1.0), (0.95, 0.5)])
def test_cocoeval_ranks_the_exported_detections_by_their_scores(records_file, records, false_score, average_precision,
                                                               capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    export(records_file, "coco")
    truth = COCO(str(records_file.parent / "coco.json"))
    guesses = copy.deepcopy(records)  # the dog also found where it is not: above or under the true dog's score
    guesses[0]["entities"][1] = entity("a dog", [STREET_DOG_REVERSED, [0, 0, 40, 30]], 200, 100,
                                       [STREET_DOG_SCORE, false_score])
    detections, _ = export(write_records(records_file.parent / "guesses.jsonl", guesses), "coco")
    assert detections["categories"] == truth.dataset["categories"] and detections["images"] == truth.dataset["images"]
    evaluation = COCOeval(truth, truth.loadRes(detections["annotations"]), "bbox")
    evaluation.params.catIds = [next(c["id"] for c in detections["categories"] if c["name"] == "a dog")]
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    capsys.readouterr()
    # ranked first, the false dog halves precision where the true one is found (101-point interpolation)
    assert evaluation.stats[1] == pytest.approx(average_precision, abs=0.01)  # AP@.5


def test_coco_file_names_open_with_supervisions_coco_loader(records_file, records):
    import supervision as sv

    export(records_file, "coco")
    dataset = sv.DetectionDataset.from_coco(str(records_file.parent / "photos"), str(records_file.parent / "coco.json"))
    assert len(dataset) == 2
    for record in (records[0], records[2]):
        _path, _image, loaded = dataset[dataset.image_paths.index(str(Path(record["resolved"]).resolve()))]
        direct = to_detections(record)
        assert loaded.xyxy.tolist() == direct.xyxy.tolist()
        assert [dataset.classes[i] for i in loaded.class_id] == direct.data["class_name"].tolist()


def test_relative_to_names_images_from_another_folder(records_file):
    dataset, _summary = export(records_file, "coco", "--relative-to", records_file.parent)
    assert [image["file_name"] for image in dataset["images"]] == ["photos/a/street.png", "photos/b/park.png"]
    result = invoke(records_file, "--format", "coco", "--out", records_file.parent / "x.json",
                    "--relative-to", records_file.parent / "photos" / "a")
    assert result.exit_code == 1
    assert result.output == (f"Error: image {records_file.parent / PARK[0]} is not under "
                             f"{records_file.parent / 'photos' / 'a'}; give a --relative-to folder that holds every "
                             "image.\n")
    assert not (records_file.parent / "x.json").exists()


# --- Label Studio -----------------------------------------------------------------------------------------------


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

    export(records_file, "label-studio", "--label-config", records_file.parent / "config.xml")
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


# --- supervision ------------------------------------------------------------------------------------------------


def test_detections_from_a_record(records):
    import supervision as sv

    detections = to_detections(records[0])
    assert isinstance(detections, sv.Detections)
    assert detections.xyxy.tolist() == [*STREET_CARS, list(STREET_DOG)]
    assert detections.confidence.tolist() == [*STREET_CAR_SCORES, STREET_DOG_SCORE]
    assert detections.data["class_name"].tolist() == ["car", "car", "a dog"]
    assert detections.data["phrase"].tolist() == ["a red car", "a red car", "a dog"]
    assert detections.class_id is None
    assert len(to_detections(records[2])) == 2  # the flat bench is left out, as in every export


def test_detections_from_an_engine_result_with_a_class_map_and_class_list():
    from kosmos_serve.engine import Result, Timings
    from kosmos_serve.grounding import Entity
    from kosmos_serve.tasks import Task

    result = Result(Task.DETECTION, "", "a red car, a dog", "", "", (
        Entity("a red car", (0, 9), ((0.05, 0.2, 0.3, 0.8), (0.5, 0.1, 0.75, 0.5)),
               ((10, 20, 60, 80), (100, 10, 150, 50)), (0.9, 0.45)),
        Entity("a dog", (11, 16), ((0.95, 0.9, 0.6, 0.4),), ((190, 90, 120, 40),), (0.6,)),
    ), "", (200, 100), 9, False, Timings())
    detections = to_detections(result, class_map={"a red car": "car"})
    assert detections.xyxy.tolist() == [*STREET_CARS, list(STREET_DOG)]
    assert detections.confidence.tolist() == [0.9, 0.45, 0.6]
    assert detections.data["class_name"].tolist() == ["car", "car", "a dog"]

    only_cars = to_detections(result, class_map={"a red car": "car"}, classes=["person", "car"])
    assert only_cars.xyxy.tolist() == STREET_CARS and only_cars.class_id.tolist() == [1, 1]
    assert only_cars.confidence.tolist() == [0.9, 0.45]
    as_dict = to_detections(result.to_dict())
    assert as_dict.data["class_name"].tolist() == ["a red car", "a red car", "a dog"]
    assert as_dict.confidence.tolist() == [0.9, 0.45, 0.6]


def test_detections_of_a_failed_record_or_without_supervision_fail_clearly(records, monkeypatch):
    with pytest.raises(InvalidRequestError, match="photos/broken.png is a failure .invalid_image."):
        to_detections(records[1])
    with pytest.raises(InvalidRequestError, match="entity 0: pixel box \\[1, 2, 3\\] is not \\[x1, y1, x2, y2\\]"):
        to_detections({"entities": [{"phrase": "a", "pixel_boxes": [[1, 2, 3]]}]})
    assert len(to_detections({"entities": []})) == 0
    monkeypatch.setitem(sys.modules, "supervision", None)  # as if it were not installed
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[supervision\]"') as error:
        to_detections(records[0])
    assert isinstance(error.value, ImportError)


# --- every format agrees ----------------------------------------------------------------------------------------


def test_every_format_gives_the_same_boxes(records_file, records):
    coco, _ = export(records_file, "coco")
    tasks, _ = export(records_file, "label-studio")
    names = {category["id"]: category["name"] for category in coco["categories"]}
    for number, record in enumerate((records[0], records[2]), start=1):
        detections = to_detections(record)
        from_supervision = [(name, tuple(box), score) for name, box, score in
                            zip(detections.data["class_name"].tolist(), detections.xyxy.tolist(),
                                detections.confidence.tolist())]
        from_coco = [(names[a["category_id"]], (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                                a["bbox"][1] + a["bbox"][3]), a["score"])
                     for a in coco["annotations"] if a["image_id"] == number]
        width, height = record["width"], record["height"]
        from_label_studio = [
            (v["rectanglelabels"][0], tuple(round(n) for n in (v["x"] * width / 100, v["y"] * height / 100,
                                                               (v["x"] + v["width"]) * width / 100,
                                                               (v["y"] + v["height"]) * height / 100)), score)
            for v, score in ((region["value"], region["score"])
                             for region in tasks[number - 1]["predictions"][0]["result"])]
        assert from_supervision == from_coco == from_label_studio
        assert len(from_coco) == (3 if number == 1 else 2)


def test_records_written_before_scores_count_each_box_one(records_file, records):
    for record in (records[0], records[2]):
        for each in record["entities"]:
            del each["scores"]
    old = write_records(records_file.parent / "old.jsonl", records)
    coco, summary = export(old, "coco")
    tasks, _ = export(old, "label-studio")
    assert [a["score"] for a in coco["annotations"]] == [1.0] * 5
    assert [r["score"] for t in tasks for r in t["predictions"][0]["result"]] == [1.0] * 5
    assert to_detections(records[0]).confidence.tolist() == [1.0] * 3
    assert summary.endswith("; scored 5 boxes 1.0 (records written before scores)")


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lines, message", [
    (['[{"image": "a.png", "text": "x"}]'],
     ("line 1 is not an annotation record: a JSON list, where a record is an object with path, width, height and "
      "entities.")),
    (["RECORD", "", '{"path": "a.png", "resolved": "/a.png", "width": 10, "height": 10}'],
     "line 3 is not an annotation record: field 'entities' is missing or not a list."),
    (["RECORD", "{not json", '{"x": 1}'],
     ("line 2 is not an annotation record: invalid JSON (Expecting property name enclosed in double quotes at "
      "column 2) (2 bad lines in all).")),
    ([json.dumps({"path": "a.png", "resolved": "/a.png", "width": 10, "height": 10,
                  "entities": [{"phrase": "a", "pixel_boxes": [[0, 0, 11, 5]]}]})],
     "line 1 is not an annotation record: entity 0: pixel box [0, 0, 11, 5] lies outside the 10x10 image."),
    ([json.dumps({"path": "a.png", "resolved": "/a.png", "width": 10, "height": 10,
                  "entities": [{"phrase": "a", "pixel_boxes": [[0, 0, 5, 5], [1, 1, 4, 4]], "scores": [0.5]}]})],
     "line 1 is not an annotation record: entity 0: 'scores' must hold one number from 0 to 1 per pixel box."),
    ([json.dumps({"path": "a.png", "resolved": "/a.png", "width": 10, "height": 10,
                  "entities": [{"phrase": "a", "pixel_boxes": [[0, 0, 5, 5]], "scores": [1.5]}]})],
     "line 1 is not an annotation record: entity 0: 'scores' must hold one number from 0 to 1 per pixel box."),
])
def test_a_file_that_is_not_records_names_its_line_and_writes_nothing(records_file, records, lines, message):
    bad = records_file.parent / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(records[0]) if line == "RECORD" else line for line in lines) + "\n")
    result = invoke(bad, "--format", "coco", "--out", records_file.parent / "out.json")
    assert result.exit_code == 1
    assert result.output == f"Error: {bad} {message}\n"
    assert not (records_file.parent / "out.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--format", "yolo"],
     ("unknown format 'yolo'; choose coco or label-studio (supervision Detections come from the Python helper "
      "kosmos_serve.exports.to_detections).")),
    (["--format", "coco", "--image-root", "/x/", "--to-name", "img"],
     "--image-root and --to-name apply to --format label-studio only."),
])
def test_bad_options_are_one_line_and_write_nothing(records_file, args, message):
    result = invoke(records_file, *args, "--out", records_file.parent / "out.json")
    assert (result.exit_code, result.output) == (1, f"Error: {message}\n")
    assert not (records_file.parent / "out.json").exists()


def test_missing_records_or_overwriting_them_is_refused(records_file):
    result = invoke(records_file.parent / "none.jsonl", "--format", "coco", "--out", records_file.parent / "o.json")
    assert result.output == (f"Error: {records_file.parent / 'none.jsonl'} does not exist; give the JSONL file "
                             "kosmos-serve annotate wrote.\n")
    before = records_file.read_text()
    result = invoke(records_file, "--format", "coco", "--out", records_file)
    assert result.exit_code == 1 and "would overwrite the records" in result.output
    assert records_file.read_text() == before


def test_a_torn_last_line_is_left_out_and_the_last_record_of_an_image_counts(records_file, records):
    again = dict(records[2], entities=[entity("a tall tree", [PARK_TREE], 300, 150, [PARK_TREE_SCORE])])
    with records_file.open("a") as file:
        file.write(json.dumps(again) + "\n" + json.dumps(records[0])[:40])  # a run killed mid-line
    dataset, summary = export(records_file, "coco")
    assert [category["name"] for category in dataset["categories"]] == ["a dog", "a tall tree", "car"]
    assert summary.endswith("1 image had several records (the last one counts); left out an incomplete last line "
                            "(a run still writing, or interrupted)")
