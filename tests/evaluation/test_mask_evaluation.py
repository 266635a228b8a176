"""`evaluate --segmenter` on a few held-out scenes with the demo model and the demo segmenter: every mask figure it
reports equals the one worked out here from the engine's own answers and the drawn masks (pycocotools decoding them,
and scoring COCOeval segm itself); --masks-from-true-boxes equals the held-out IoU of docs/demo-segmenter.md (the
training code's own scoring); without a segmenter nothing changes; and bad requests are one line."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as coco_mask

from kosmos_serve.cli import main
from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, Request
from kosmos_serve.evaluation.backends import Generation
from kosmos_serve.evaluation.detection import detection_record, read_detection, read_detection_splits
from kosmos_serve.evaluation.detection_metrics import summarise
from kosmos_serve.evaluation.runner import Settings
from kosmos_serve.evaluation.synthetic import write_detection_file
from kosmos_serve.grounding import iou
from kosmos_serve.images import load_image
from kosmos_serve.tasks import Task, TaskInput
from kosmos_serve.training.demo_model import HELD_OUT_SEED
from kosmos_serve.training.shapes import write_shapes_dataset

SCENES = 5  # 13 objects: a few seconds of the demo model and segmenter
TOKENS = 24
MASK_KEYS = ("masks", "mask_ious", "segmenter")


def invoke(*args):
    return CliRunner().invoke(main, ["evaluate", *(str(a) for a in args)], catch_exceptions=False)


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pixels(mask: dict) -> np.ndarray:
    return coco_mask.decode({"size": mask["size"], "counts": mask["counts"].encode("ascii")}).astype(bool)


def mask_iou(first: dict, second: dict) -> float:
    a, b = pixels(first), pixels(second)
    return float((a & b).sum() / (a | b).sum())


def found_by(truth_box, candidates):
    """The candidate (box, score, mask) the detection benchmark would match to `truth_box`, or None."""
    matching = [c for c in candidates if iou(c[0], truth_box) >= 0.5]
    return max(matching, key=lambda c: c[1], default=None)  # the first of equal scores


def summary(ious: list[float], objects: int) -> str:
    """How `evaluate --data` words a MaskScore."""
    mean, share = sum(ious) / len(ious), sum(v >= 0.5 for v in ious) / len(ious)
    return f"mean IoU {mean:.3f} over {len(ious)} of {objects} objects; IoU>=0.5: {share:.1%}"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Held-out scenes; `masked`: their referring records, and their caption records with each span's mask too."""
    folder = tmp_path_factory.mktemp("mask-scenes")
    records_path = write_shapes_dataset(folder, SCENES, HELD_OUT_SEED)
    records = read_lines(records_path)
    masks = {(r["image"], tuple(r["boxes"][0])): r["masks"] for r in records if r.get("task") == "referring"}
    masked = []
    for record in records:
        if "caption" in record:
            spans = [{**span, "masks": masks[(record["image"], tuple(span["boxes"][0]))]} for span in record["spans"]]
            masked.append({**record, "spans": spans})
        elif record.get("task") == "referring":
            masked.append(record)
    (folder / "masked.jsonl").write_text("".join(json.dumps(record) + "\n" for record in masked))
    return SimpleNamespace(folder=folder, records=records_path, masked=folder / "masked.jsonl", lines=masked,
                           detection=write_detection_file(folder, absent=2, seed=HELD_OUT_SEED))


@pytest.fixture(scope="module")
def engine():
    from kosmos_serve.engine.loading import quiet_transformers

    quiet_transformers()
    return Engine(EngineSettings(model="demo", segmenter="demo", max_batch_rows=16))


@pytest.fixture(scope="module")
def held_out(scenes):
    """Each object's mask IoU from its exact box, as the demo segmenter's held-out score is computed (training code),
    by (image, box)."""
    from transformers import SamModel, SamProcessor

    from kosmos_serve.engine.loading import DEMO_SEGMENTER_DIR
    from kosmos_serve.training.segmenter import mask_iou as drawn_iou
    from kosmos_serve.training.segmenter import segment, shapes_scene

    model, processor = SamModel.from_pretrained(DEMO_SEGMENTER_DIR).eval(), SamProcessor.from_pretrained(
        DEMO_SEGMENTER_DIR)
    ious = {}
    for index in range(SCENES):
        scene = shapes_scene(HELD_OUT_SEED, index)
        predicted, _ = segment(model, processor, scene.image, [obj.box for obj in scene.objects])
        for obj, mask, truth in zip(scene.objects, predicted, scene.masks):
            ious[(f"images/{index:06d}.png", obj.box)] = drawn_iou(mask, truth)
    return ious


def test_data_masks_are_the_ious_worked_out_here_and_nothing_else_changes(scenes, engine, monkeypatch):
    monkeypatch.setenv("KOSMOS_SEGMENTER", "demo")  # the setting serve, predict and annotate read
    with_masks = invoke("--model", "demo", "--data", scenes.masked)
    assert with_masks.exit_code == 0, with_masks.output

    params = GenerationParams(max_new_tokens=64, no_repeat_ngram_size=0, masks=True)
    requests, asked = [], []
    for record in scenes.lines:
        image = load_image(scenes.folder / record["image"])
        if "caption" in record:
            task = TaskInput(Task.CAPTION)
            truths = [(record["caption"][s["start"]:s["end"]], s["boxes"][0], s["masks"][0]) for s in record["spans"]]
        else:
            task = TaskInput(Task.RAW, prompt=f"<grounding><phrase> {record['expression']}</phrase>", grounding=False)
            truths = [(record["expression"], record["boxes"][0], record["masks"][0])]
        requests.append(Request(image, task, params))
        asked.append(("caption" if "caption" in record else "referring", truths))
    found = {"caption": [], "referring": []}
    for (kind, truths), answer in zip(asked, engine.run(requests)):  # each answer is the request's alone
        width, height = answer.image_size
        for phrase, box, mask in truths:
            candidates = [((x1 * width, y1 * height, x2 * width, y2 * height), score, found_mask.to_dict())
                          for entity in answer.entities if entity.phrase.lower() == phrase.lower()
                          for (x1, y1, x2, y2), score, found_mask in zip(entity.boxes, entity.scores, entity.masks)]
            match = found_by(box, candidates)
            found[kind].append(None if match is None else mask_iou(match[2], mask))
    for kind, name in (("caption", "masks of the brief caption's objects, from the boxes found"),
                       ("referring", "masks of the referring expressions' objects, from the boxes found")):
        ious = [value for value in found[kind] if value is not None]
        assert len(ious) >= len(found[kind]) // 2 > 0  # the demo model finds most objects
        assert f"{name}: {summary(ious, len(found[kind]))}" in with_masks.output.splitlines()

    monkeypatch.delenv("KOSMOS_SEGMENTER")
    plain = invoke("--model", "demo", "--data", scenes.masked)
    assert plain.exit_code == 0, plain.output
    assert plain.output.splitlines() == [line for line in with_masks.output.splitlines() if "masks" not in line]
    assert len(plain.output.splitlines()) == 2  # caption and referring; no mask is scored without a segmenter


def test_masks_from_true_boxes_are_the_held_out_ious(scenes, held_out):
    result = invoke("--segmenter", "demo", "--masks-from-true-boxes", "--data", scenes.records)
    assert result.exit_code == 0, result.output
    ious = list(held_out.values())
    assert result.output.splitlines() == [
        f"masks from the true boxes (the segmenter alone): {summary(ious, len(ious))}"]


def test_detection_masks_as_worked_out_here_and_as_pycocotools_scores_them(scenes, tmp_path):
    out, plain_out = tmp_path / "masks.jsonl", tmp_path / "plain.jsonl"
    common = ("--model", "demo", "--benchmark", "detection", "--annotations", scenes.detection, "--images",
              scenes.folder, "--max-new-tokens", TOKENS)
    result = invoke(*common, "--segmenter", "demo", "--out", out)
    assert result.exit_code == 0, result.output
    plain = invoke(*common, "--out", plain_out)
    assert plain.exit_code == 0, plain.output

    lines, plain_lines = read_lines(out), read_lines(plain_out)
    assert _without_masks(lines) == plain_lines  # asking for masks changes no box, score or anything else
    assert all(line["segmenter"] == "demo" for line in lines)
    assert not any(key in item for line in plain_lines for item in line["asked"] for key in MASK_KEYS)
    assert "Masks" not in plain.output and "segm" not in plain.output
    assert _rows(result.output, "boxes' scores")[0] == _rows(plain.output, "boxes' scores")[0]  # the same boxes

    truth = json.loads(scenes.detection.read_text())
    masks = {(a["image_id"], tuple(a["bbox"])): a["segmentation"] for a in truth["annotations"]}
    ious = []
    for line in lines:
        pooled = {}
        for item in line["asked"]:
            assert len(item["masks"]) == len(item["boxes"])
            pooled.setdefault(item["category_id"], []).extend(zip(item["boxes"], item["scores"], item["masks"]))
        for item in line["asked"]:
            expected = []
            for x1, y1, x2, y2 in item["truth"]:
                match = found_by((x1, y1, x2, y2), pooled[item["category_id"]])
                own = masks[(line["image_id"], (x1, y1, x2 - x1, y2 - y1))]
                expected.append(None if match is None else mask_iou(match[2], own))
            assert item["mask_ious"] == pytest.approx(expected)
            ious += expected
    matched = [value for value in ious if value is not None]
    assert len(matched) >= len(ious) - 2 > 10
    mean, share = sum(matched) / len(matched), sum(v >= 0.5 for v in matched) / len(matched)
    assert (f"{len(matched)} of {len(ious)} objects found; mean mask IoU {mean:.3f}, IoU >= 0.5: {100 * share:.1f}%"
            in result.output.splitlines())
    assert _rows(result.output, "boxes' scores")[1][1:] == _segm_eval(scenes.detection, [
        {"image_id": line["image_id"], "category_id": item["category_id"], "segmentation": mask, "score": score}
        for line in lines for item in line["asked"] for mask, score in zip(item["masks"], item["scores"])])

    mixed = invoke(*common, "--out", out)  # a masks run's file is not continued without its segmenter
    assert mixed.exit_code == 1
    assert f"--out {out} line 1 was made with segmenter 'demo', not this run's None" in mixed.output


def test_detection_masks_from_true_boxes_are_the_held_out_ious(scenes, held_out, tmp_path):
    out = tmp_path / "true-boxes.jsonl"
    result = invoke("--segmenter", "demo", "--masks-from-true-boxes", "--benchmark", "detection", "--annotations",
                    scenes.detection, "--images", scenes.folder, "--out", out)
    assert result.exit_code == 0, result.output
    found = {}
    for line in read_lines(out):
        assert line["model"] == "true boxes" and line["segmenter"] == "demo"
        for item in line["asked"]:
            for box, value in zip(item["truth"], item["mask_ious"]):
                found[(line["image"], tuple(int(v) for v in box))] = value
    assert found == pytest.approx(held_out)
    ious = list(held_out.values())
    mean, share = sum(ious) / len(ious), sum(v >= 0.5 for v in ious) / len(ious)
    assert (f"{len(ious)} of {len(ious)} objects found; mean mask IoU {mean:.3f}, IoU >= 0.5: {100 * share:.1f}%"
            in result.output.splitlines())
    assert "COCOeval (bbox)" not in result.output and "AUROC" not in result.output  # no box is the model's


@pytest.mark.parametrize(("args", "message"), [
    (["--masks-from-true-boxes", "--data", "{records}"],
     "Error: --masks-from-true-boxes measures a segmenter alone: add --segmenter MODEL (or set KOSMOS_SEGMENTER)"),
    (["--masks-from-true-boxes", "--segmenter", "demo", "--model", "demo", "--data", "{records}"],
     "Error: --masks-from-true-boxes runs the segmenter alone, no Kosmos-2: leave out --model."),
    (["--model", "demo", "--segmenter", "demo", "--data", "{plain}"],
     "Error: --segmenter: {plain} gives no true masks to score masks against"),
    (["--model", "demo", "--segmenter", "demo", "--benchmark", "refcoco", "--annotations", "{detection}",
      "--images", "{folder}"], ("Error: --segmenter: masks are scored on --data records with masks or --benchmark "
                                "detection ground truth with segmentation; refcoco has no masks")),
    (["--url", "http://127.0.0.1:9", "--segmenter", "demo", "--benchmark", "detection", "--annotations",
      "{detection}", "--images", "{folder}"], "Error: --segmenter loads the segmenter here; through --url"),
    (["--model", "demo", "--segmenter", "demo", "--benchmark", "detection", "--annotations", "{boxes_only}",
      "--images", "{folder}"], 'Error: {boxes_only}: annotations[0] has no "segmentation": scoring masks'),
])
def test_bad_requests_are_one_line_before_any_model_loads(scenes, tmp_path, monkeypatch, args, message):
    monkeypatch.delenv("KOSMOS_SEGMENTER", raising=False)
    plain = tmp_path / "plain.jsonl"  # the records without their masks
    plain.write_text("".join(json.dumps({**{k: v for k, v in r.items() if k != "masks"},
                                         "image": str(scenes.folder / r["image"])}) + "\n"
                             for r in read_lines(scenes.records)))
    truth = json.loads(scenes.detection.read_text())
    boxes_only = tmp_path / "boxes.json"  # the detection file without segmentation
    boxes_only.write_text(json.dumps({**truth, "annotations": [
        {k: v for k, v in a.items() if k != "segmentation"} for a in truth["annotations"]]}))
    names = {"records": scenes.records, "plain": plain, "detection": scenes.detection, "folder": scenes.folder,
             "boxes_only": boxes_only}
    result = invoke(*(arg.format(**names) for arg in args))
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(message.format(**names)), result.output


def test_segmentations_are_read_as_pycocotools_reads_them(tmp_path):
    from pycocotools.coco import COCO

    polygon = [[10, 10, 30, 10, 30, 25, 10, 25]]
    square = np.pad(np.ones((5, 5), np.uint8), ((3, 32), (4, 51)))  # 40 x 60
    compressed = coco_mask.encode(np.asfortranarray(square))
    flat = square.T.ravel()  # COCO's runs go down the columns, background first
    counts = np.diff(np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))).tolist()
    segmentations = [polygon, {"size": [40, 60], "counts": compressed["counts"].decode()},
                     {"size": [40, 60], "counts": counts}]
    truth = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}],
             "categories": [{"id": 1, "name": "a square"}],
             "annotations": [{"id": n, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 15], "segmentation": s}
                             for n, s in enumerate(segmentations, start=1)]}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    (example,), read = read_detection(tmp_path / "truth.json", tmp_path, masks=True)
    coco = COCO(str(tmp_path / "truth.json"))
    for annotation, theirs in zip(read["annotations"], coco.loadAnns([1, 2, 3])):
        expected = coco.annToRLE(theirs)
        assert annotation["segmentation"] == {"size": expected["size"], "counts": expected["counts"] if isinstance(
            expected["counts"], str) else expected["counts"].decode()}
    assert [mask.to_dict() for mask in example.asked[0].masks] == [a["segmentation"] for a in read["annotations"]]
    assert read["images"] == [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}]


def test_an_image_where_nothing_is_found_has_its_objects_counted_unfound(tmp_path):
    truth = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}],
             "categories": [{"id": 1, "name": "a square"}, {"id": 2, "name": "a star"}],
             "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 15],
                              "segmentation": [[10, 10, 30, 10, 30, 25, 10, 25]]}]}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    (split,) = read_detection_splits([tmp_path / "truth.json"], tmp_path, masks=True)
    nothing = Generation("", (), (60, 40), (), ())
    line = detection_record(split, split.examples[0], nothing, Settings("demo", 24, 3, "coco", "demo"))
    assert [(item["masks"], item["mask_ious"]) for item in line["asked"]] == [([], [None]), ([], [])]
    masks = summarise(split.ground_truth, [line], masks=True).masks
    assert (masks.ious, masks.mean, masks.coco.ap) == ([None], None, 0.0)


def _without_masks(lines: list[dict]) -> list[dict]:
    """Predictions lines with their masks, mask IoUs and segmenter taken out."""
    return [{**{k: v for k, v in line.items() if k != "segmenter"},
             "asked": [{k: v for k, v in item.items() if k not in MASK_KEYS} for item in line["asked"]]}
            for line in lines]


def _rows(report: str, first: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in report.splitlines() if line.startswith(first)]


def _segm_eval(truth_file, results) -> list[str]:
    """AP, AP50, AR@100 of the masks by pycocotools itself."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = COCO(str(truth_file))
    evaluation = COCOeval(truth, truth.loadRes(results), "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return [f"{100 * evaluation.stats[i]:.2f}" for i in (0, 1, 8)]
