"""Exports of records with masks (`annotate --masks`), each read back by the tool that takes it: COCO segmentation
with pycocotools (its own decoding, area and COCOeval "segm"), supervision's Detections.mask, and Label Studio's
brush and polygon regions with Label Studio's own SDK (its brush decoder and its check of imported predictions).

The masks are real: an ellipse in each box, encoded by pycocotools as the engine encodes them.
"""

from __future__ import annotations

import copy
import json
import subprocess
import tempfile

import numpy as np
import pytest
from records_for_export import (
    PARK,
    STREET,
    add_masks,
    encode,
    export,
    make_records,
    write_records,
)

from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.exports import export_records, to_detections
from kosmos_serve.exports.masks import brush_rle, mask_area, mask_pixels, outline

pytestmark = [pytest.mark.filterwarnings("ignore:OpenCV:UserWarning"),  # supervision falls back to NumPy
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # pycocotools'


@pytest.fixture
def records(tmp_path):
    return make_records(tmp_path)


@pytest.fixture
def pixels(records):
    return add_masks(records)


@pytest.fixture
def records_file(tmp_path, records, pixels):
    return write_records(tmp_path / "results.jsonl", records)


def kept_masks(records, pixels):
    """The masks of the boxes every export keeps (the flat bench is left out), in the exports' order."""
    street = [pixels[0, 0, 0], pixels[0, 0, 1], pixels[0, 1, 0]]
    park = [pixels[2, 0, 0], pixels[2, 1, 0]]  # a tree, a truck
    return street, park


# --- the masks themselves -----------------------------------------------------------------------------------------


def test_masks_decode_as_pycocotools_decodes_them():
    from pycocotools import mask as coco_mask

    generator = np.random.default_rng(7)
    for height, width in [(1, 1), (3, 2), (40, 37), (100, 260)]:
        for density in (0.0, 0.05, 0.5, 1.0):
            pixels = generator.random((height, width)) < density
            encoded = coco_mask.encode(np.asfortranarray(pixels.astype(np.uint8)))
            mask = encode(pixels)
            assert (mask_pixels(mask) == coco_mask.decode(encoded).astype(bool)).all()
            assert mask_area(mask) == coco_mask.area(encoded) == pixels.sum()


def test_outline_is_the_largest_part_along_its_pixel_edges():
    from pycocotools import mask as coco_mask

    part = np.zeros((60, 80), bool)
    part[10:50, 20:70] = True
    speck = part.copy()
    speck[55:58, 2:5] = True  # a small second part: left out, as Label Studio's SAM backend leaves it
    assert outline(speck) == outline(part) == [(20.0, 10.5), (20.5, 10.0), (69.5, 10.0), (70.0, 10.5), (70.0, 49.5),
                                               (69.5, 50.0), (20.5, 50.0), (20.0, 49.5)]
    disc = np.hypot(*(np.mgrid[:120, :90] + 0.5 - [[[60]], [[45]]])) <= 40
    ring = outline(disc)
    drawn = coco_mask.decode(coco_mask.frPyObjects([[v for point in ring for v in point]], 120, 90))[:, :, 0]
    assert (drawn & disc).sum() / (drawn | disc).sum() > 0.97
    assert outline(np.zeros((4, 4), bool)) == []


# --- COCO ---------------------------------------------------------------------------------------------------------


def test_coco_segmentation_is_each_boxs_mask_and_segm_evaluation_runs(records_file, records, pixels, capsys):
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset, summary = export(records_file, "coco")
    assert "5 boxes (5 with masks)" in summary
    coco = COCO(str(records_file.parent / "coco.json"))
    street, park = kept_masks(records, pixels)
    for annotation, expected in zip(coco.loadAnns(coco.getAnnIds()), street + park, strict=True):
        assert (coco.annToMask(annotation) == expected).all()
        assert annotation["area"] == coco_mask.area(annotation["segmentation"]) == expected.sum()
    assert dataset["annotations"][0]["segmentation"] == records[0]["entities"][0]["masks"][0]
    assert dataset["annotations"][0]["bbox"] == [10, 20, 50, 60]  # the box stays Kosmos-2's

    def mean_precision(ground_truth, annotations):
        results = ground_truth.loadRes(copy.deepcopy(annotations))
        evaluation = COCOeval(ground_truth, results, "segm")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
        capsys.readouterr()
        return evaluation.stats[0]

    assert mean_precision(coco, dataset["annotations"]) == pytest.approx(1.0)  # the masks against themselves
    shrunk = copy.deepcopy(dataset)  # a ground truth whose tree is a quarter of the predicted one
    tree = shrunk["annotations"][3]
    quarter = np.zeros_like(park[0])
    quarter[:, :60] = park[0][:, :60]
    quarter[:75] = False
    tree["segmentation"], tree["area"] = encode(quarter), int(quarter.sum())
    (records_file.parent / "truth.json").write_text(json.dumps(shrunk))
    assert mean_precision(COCO(str(records_file.parent / "truth.json")), dataset["annotations"]) < 0.9


def test_records_without_masks_keep_an_empty_segmentation_and_the_boxs_area(tmp_path):
    dataset, summary = export(write_records(tmp_path / "r.jsonl", make_records(tmp_path)), "coco")
    assert all(annotation["segmentation"] == [] for annotation in dataset["annotations"])
    assert dataset["annotations"][0]["area"] == 50 * 60 and "with masks" not in summary


# --- supervision --------------------------------------------------------------------------------------------------


def test_detections_carry_the_masks(records, pixels):
    street, park = kept_masks(records, pixels)
    detections = to_detections(records[0])
    assert detections.mask.shape == (3, STREET[2], STREET[1]) and detections.mask.dtype == bool
    assert all((got == expected).all() for got, expected in zip(detections.mask, street, strict=True))
    assert detections.data["mask_score"].tolist() == [0.8, 0.85, 0.8]
    cars = to_detections(records[2], class_map={}, classes=["car"])
    assert cars.mask.shape == (1, PARK[2], PARK[1]) and (cars.mask[0] == park[1]).all()


def test_detections_from_an_engine_result_with_masks(records, pixels):
    from kosmos_serve.engine import Result, Timings
    from kosmos_serve.grounding import Entity, Mask
    from kosmos_serve.tasks import Task

    street = records[0]["entities"][0]
    masks = tuple(Mask(tuple(m["size"]), m["counts"]) for m in street["masks"])
    result = Result(Task.DETECTION, "", "a red car", "", "", (
        Entity("a red car", (0, 9), tuple(map(tuple, street["boxes"])), tuple(map(tuple, street["pixel_boxes"])),
               (0.9, 0.45), masks, (0.97, 0.88)),), "", (200, 100), 9, False, Timings())
    detections = to_detections(result)
    assert (detections.mask[1] == pixels[0, 0, 1]).all() and detections.data["mask_score"].tolist() == [0.97, 0.88]
    from_json = to_detections(result.to_dict())  # the /v1/generate answer: entity_dict writes masks and mask_scores
    assert (from_json.mask == detections.mask).all()
    assert to_detections({"entities": []}).mask is None


# --- Label Studio -------------------------------------------------------------------------------------------------

# Runs in Label Studio's own environment: for each (labeling config, tasks), the errors Label Studio's check of
# imported predictions finds (data_import/api.py calls validate_prediction), each brush region decoded by its
# converter (label_studio_sdk.converter.brush.decode_rle: RGBA bytes, the alpha channel as the mask), and whether
# its encoder (brush.mask2rle) writes the same bytes for that mask.
LABEL_STUDIO_READS = """
import json, sys
import numpy as np
from label_studio_sdk.converter import brush
from label_studio_sdk.label_interface import LabelInterface

answer = []
for config, tasks in json.load(sys.stdin):
    interface = LabelInterface(config)
    errors = [error for task in tasks for prediction in task["predictions"]
              for error in interface.validate_prediction(prediction, return_errors=True)]
    brushes = [region for task in tasks for region in task["predictions"][0]["result"]
               if region["type"] == "brushlabels"]
    decoded = [np.reshape(brush.decode_rle(region["value"]["rle"]),
                          [region["original_height"], region["original_width"], 4])[:, :, 3] for region in brushes]
    reencoded = [brush.mask2rle(alpha) == region["value"]["rle"] for alpha, region in zip(decoded, brushes)]
    answer.append({"errors": errors, "decoded": [alpha.tolist() for alpha in decoded], "reencoded": reencoded})
print(json.dumps(answer))
"""


def label_studio_reads(python, *cases):
    run = subprocess.run([python, "-c", LABEL_STUDIO_READS], input=json.dumps(cases), capture_output=True,
                         text=True, timeout=300, cwd=tempfile.gettempdir(), check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_brush_and_polygon_regions_pass_label_studios_checks_and_decode_to_the_masks(
        records_file, records, pixels, label_studio_python):
    folder = records_file.parent
    out = {}
    for mask_format in ("brush", "polygon"):
        report = export_records(records_file, "label-studio", folder / f"{mask_format}.json",
                                label_config=folder / f"{mask_format}.xml", mask_format=mask_format)
        assert report.masks == 5 and report.masks_not_exported == 0
        out[mask_format] = (folder / f"{mask_format}.xml").read_text(), json.loads((folder / f"{mask_format}.json")
                                                                                   .read_text())
    (brush_config, brush_tasks), (polygon_config, polygon_tasks) = out["brush"], out["polygon"]
    assert '<BrushLabels name="label" toName="image">' in brush_config
    assert '<PolygonLabels name="label" toName="image">' in polygon_config
    rectangles = json.loads(json.dumps(export(records_file, "label-studio")[0]))

    brush_read, polygon_read, mixed_read = label_studio_reads(
        label_studio_python, (brush_config, brush_tasks), (polygon_config, polygon_tasks), (brush_config, rectangles))
    assert brush_read["errors"] == [] and polygon_read["errors"] == []
    assert mixed_read["errors"]  # the check does check: rectangles are not a BrushLabels project's regions
    street, park = kept_masks(records, pixels)
    assert brush_read["decoded"] == [(expected.astype(int) * 255).tolist() for expected in street + park]
    assert brush_read["reencoded"] == [True] * 5  # byte for byte what Label Studio's own encoder writes

    region = brush_tasks[0]["predictions"][0]["result"][0]
    assert region == {"id": "kosmos-1-1", "type": "brushlabels", "from_name": "label", "to_name": "image",
                      "original_width": 200, "original_height": 100, "image_rotation": 0,
                      "value": {"format": "rle", "rle": brush_rle(street[0]), "brushlabels": ["car"]}, "score": 0.9}
    assert [task["predictions"][0]["score"] for task in brush_tasks] == [
        task["predictions"][0]["score"] for task in rectangles]  # scores and model versions as for boxes
    assert {task["predictions"][0]["model_version"] for task in brush_tasks} == {"kosmos-2:demo"}

    polygon = polygon_tasks[1]["predictions"][0]["result"][0]  # the park's tree, an ellipse 60 x 120 in 300 x 150
    assert polygon["type"] == "polygonlabels" and polygon["value"]["polygonlabels"] == ["a tree"]
    assert polygon["value"]["closed"] is True and polygon["score"] == 0.8
    points = np.array(polygon["value"]["points"]) * [300 / 100, 150 / 100]
    assert points.min(axis=0).tolist() == [30.0, 15.0] and points.max(axis=0).tolist() == [90.0, 135.0]
    assert np.allclose(points, outline(park[0]))


def test_label_studio_without_a_mask_format_exports_boxes_and_says_the_masks_were_left(records_file):
    tasks, summary = export(records_file, "label-studio")
    assert {region["type"] for task in tasks for region in task["predictions"][0]["result"]} == {"rectanglelabels"}
    assert "exported 5 masked boxes as boxes only (--mask-format brush or polygon exports their masks)" in summary


def test_an_empty_mask_leaves_its_box_out_of_brush_and_polygon_regions(tmp_path, records, pixels):
    records[2]["entities"][0]["masks"][0] = encode(np.zeros((PARK[2], PARK[1]), bool))
    path = write_records(tmp_path / "results.jsonl", records)
    for mask_format in ("brush", "polygon"):
        report = export_records(path, "label-studio", tmp_path / "tasks.json", mask_format=mask_format)
        tasks = json.loads((tmp_path / "tasks.json").read_text())
        assert [region["id"] for region in tasks[1]["predictions"][0]["result"]] == ["kosmos-2-2"]
        assert report.empty_masks == 1 and "left out 1 box whose mask is empty (no pixel to draw)" in report.summary()
    coco, _ = export(path, "coco")
    assert coco["annotations"][3]["area"] == 0  # COCO keeps the box, with its empty mask


def test_the_export_command_takes_a_mask_format(records_file):
    tasks, summary = export(records_file, "label-studio", "--mask-format", "polygon")
    assert {region["type"] for task in tasks for region in task["predictions"][0]["result"]} == {"polygonlabels"}
    assert "5 boxes (5 with masks)" in summary and "boxes only" not in summary


# --- bad input ----------------------------------------------------------------------------------------------------


def test_a_mask_format_needs_records_with_masks_and_label_studio(tmp_path):
    plain = write_records(tmp_path / "plain.jsonl", make_records(tmp_path))
    with pytest.raises(InvalidRequestError, match=r"--mask-format brush: the boxes of .*street.png have no masks; "
                                                  r"annotate with --masks"):
        export_records(plain, "label-studio", tmp_path / "t.json", mask_format="brush")
    with pytest.raises(InvalidRequestError, match="--mask-format apply to --format label-studio only"):
        export_records(plain, "coco", tmp_path / "c.json", mask_format="polygon")
    with pytest.raises(InvalidRequestError, match="unknown --mask-format 'bitmap'; choose brush or polygon"):
        export_records(plain, "label-studio", tmp_path / "t.json", mask_format="bitmap")
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "c.json").exists()


BAD_MASKS = [
    ("one mask for two boxes", lambda e: e["masks"].pop(), "entity 0: 'masks' must hold one mask per pixel box"),
    ("no mask scores", lambda e: e.pop("mask_scores"), "entity 0: 'mask_scores' must hold one number per pixel box"),
    ("a mask of another size", lambda e: e["masks"][1].update(size=[100, 100]),
     "entity 0: mask 1 its size 100 x 100 is not the image's 100 x 200"),
    ("counts short of the image", lambda e: e["masks"][0].update(counts="0"),
     "entity 0: mask 0 its counts cover 0 pixels, not 100 x 200"),
    ("not a mask", lambda e: e["masks"].__setitem__(0, [1, 2]), 'entity 0: mask 0 must be {"size": [height, width]'),
]


@pytest.mark.parametrize(("change", "message"), [case[1:] for case in BAD_MASKS], ids=[case[0] for case in BAD_MASKS])
def test_a_bad_mask_in_a_record_names_its_line_and_entity(tmp_path, records, pixels, change, message):
    change(records[0]["entities"][0])
    path = write_records(tmp_path / "results.jsonl", records)
    with pytest.raises(InvalidRequestError, match="line 1 is not an annotation record: ") as error:
        export_records(path, "coco", tmp_path / "coco.json")
    assert message in str(error.value)
    assert not (tmp_path / "coco.json").exists()
