"""Exports of annotation records, each checked with the real tool that reads it: COCO with pycocotools (and
supervision's COCO loader), supervision.Detections with the real supervision; all formats give the same boxes
and scores. Label Studio's own checks are in test_exports_label_studio.py.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from records_for_export import (
    PARK,
    PARK_TREE,
    PARK_TREE_SCORE,
    STREET_CAR_SCORES,
    STREET_CARS,
    STREET_DOG,
    STREET_DOG_REVERSED,
    STREET_DOG_SCORE,
    entity,
    export,
    invoke,
    make_records,
    write_records,
)

from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.exports import MissingExtraError, to_detections

pytestmark = pytest.mark.filterwarnings("ignore:OpenCV:UserWarning")  # supervision falls back to NumPy


@pytest.fixture
def records(tmp_path):
    return make_records(tmp_path)


@pytest.fixture
def records_file(tmp_path, records):
    return write_records(tmp_path / "results.jsonl", records)


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
     ("unknown format 'yolo'; choose coco, label-studio, text or markdown (supervision Detections come from the "
      "Python helper kosmos_serve.exports.to_detections).")),
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
