"""`evaluate --benchmark detection` end to end: the synthetic scenes' detection file, runs of the tiny and the demo
model on COCO ground truth, the figures recomputed here from the predictions with pycocotools, and bad input."""

import json
import re
import sys

import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from kosmos_serve.cli import main
from kosmos_serve.engine import GenerationParams, Request
from kosmos_serve.evaluation.synthetic import absent_phrases, class_phrase, write_detection_file
from kosmos_serve.tasks import Task, TaskInput
from kosmos_serve.training.shapes import COLOURS, SHAPES

TOKENS = 24


def invoke(*args):
    return CliRunner().invoke(main, ["evaluate", *(str(a) for a in args)], catch_exceptions=False)


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def table(report: str, first: str) -> list[str]:
    return next(re.split(r"\s{2,}", line.strip()) for line in report.splitlines() if line.startswith(first))


def kind(phrase: str) -> tuple[str, str]:
    words = phrase.split()
    return next(w for w in words if w in COLOURS), next(w for w in words if w in SHAPES)


def test_each_scene_is_asked_for_its_objects_and_four_kinds_it_lacks(shapes, detection_file):
    truth = json.loads(detection_file.read_text())
    names = {c["id"]: c["name"] for c in truth["categories"]}
    records = [json.loads(line) for line in shapes.records.read_text().splitlines()]
    assert len(truth["annotations"]) == sum(r.get("task") == "referring" for r in records) > 10
    other_seed = 0
    for image in truth["images"]:
        own = [names[a["category_id"]] for a in truth["annotations"] if a["image_id"] == image["id"]]
        assert sorted(own) == sorted(class_phrase(*kind(r["expression"])) for r in records
                                     if r["image"] == image["file_name"] and r.get("task") == "referring")
        absent = [names[number] for number in image["neg_category_ids"]]
        assert len(set(absent)) == 4 and not {kind(p) for p in absent} & {kind(p) for p in own}
        assert absent == absent_phrases([kind(p) for p in own], 4, seed=2, scene=image["id"])
        other_seed += absent != absent_phrases([kind(p) for p in own], 4, seed=3, scene=image["id"])
    assert other_seed > 0  # another seed draws other absent phrases
    assert write_detection_file(shapes.folder, absent=4, seed=2).read_bytes() == detection_file.read_bytes()


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Three images of one or two shapes drawn here, and their COCO ground truth (a category no image has too)."""
    folder = tmp_path_factory.mktemp("coco")
    scenes = [[("red", "circle", (20, 30, 100, 110))], [("blue", "square", (120, 40, 200, 120))],
              [("red", "circle", (150, 100, 230, 180)), ("blue", "square", (10, 10, 70, 70))]]
    categories = {"the red circle": 1, "the blue square": 2, "the green star": 3}
    truth = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in categories.items()]}
    for number, scene in enumerate(scenes, start=1):
        image = Image.new("RGB", (240, 200), (225, 225, 225))
        draw = ImageDraw.Draw(image)
        for colour, shape, (x1, y1, x2, y2) in scene:
            (draw.ellipse if shape == "circle" else draw.rectangle)((x1, y1, x2 - 1, y2 - 1), fill=COLOURS[colour])
            truth["annotations"].append({"id": len(truth["annotations"]) + 1, "image_id": number, "iscrowd": 0,
                                         "category_id": categories[f"the {colour} {shape}"],
                                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
        image.save(folder / f"{number}.png")
        truth["images"].append({"id": number, "file_name": f"{number}.png", "width": 240, "height": 200})
    (folder / "truth.json").write_text(json.dumps(truth))
    return folder


def cocoeval(truth_file, lines, constant=None):
    """AP, AP50, AR@100 by pycocotools itself, from the predictions lines."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = [{"image_id": line["image_id"], "category_id": item["category_id"], "score": constant or score,
                "bbox": [x1, y1, x2 - x1, y2 - y1]}
               for line in lines for item in line["asked"] for (x1, y1, x2, y2), score in zip(item["boxes"],
                                                                                               item["scores"])]
    truth = COCO(str(truth_file))
    evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return [f"{100 * evaluation.stats[i]:.2f}" for i in (0, 1, 8)]


def test_the_tiny_model_on_coco_ground_truth(tiny_model_dir, drawn, tmp_path):
    """The tiny random model writes no well-formed box: every phrase is asked, none keeps a box, AP is 0."""
    out = tmp_path / "tiny.jsonl"
    result = invoke("--model", tiny_model_dir, "--benchmark", "detection", "--annotations", drawn / "truth.json",
                    "--images", drawn, "--out", out, "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    lines = read_lines(out)
    assert [line["image"] for line in lines] == ["1.png", "2.png", "3.png"]
    assert [[(item["phrase"], item["present"]) for item in line["asked"]] for line in lines] == [
        [("the red circle", True), ("the blue square", False), ("the green star", False)],
        [("the red circle", False), ("the blue square", True), ("the green star", False)],
        [("the red circle", True), ("the blue square", True), ("the green star", False)]]
    assert all(item["boxes"] == [] for line in lines for item in line["asked"])
    assert all(line["raw_text"].count("<grounding><phrase>") == 3 for line in lines)  # one prompt per phrase
    assert "3 images scored, 0 skipped; 9 phrases asked (4 present, 5 absent), 4 objects" in result.output
    assert table(result.output, "boxes' scores") == ["boxes' scores", "0.00", "0.00", "0.00"]
    assert "Score AUROC, present against absent phrases: 0.500" in result.output  # every phrase scores 0
    assert table(result.output, "0.00 ") == ["0.00", "0.00", "0.00", "-"]


def test_the_demo_model_on_coco_ground_truth_as_pycocotools_scores_it(demo_engine, drawn, tmp_path):
    out = tmp_path / "demo.jsonl"
    result = invoke("--model", "demo", "--benchmark", "detection", "--annotations", drawn / "truth.json",
                    "--images", drawn, "--out", out, "--max-new-tokens", TOKENS)
    assert result.exit_code == 0, result.output
    lines = read_lines(out)
    for line in lines:  # the very boxes and scores the engine gives the same request here
        image = Image.open(drawn / line["image"]).convert("RGB")
        phrases = tuple(item["phrase"] for item in line["asked"])
        answer = demo_engine.run([Request(image, TaskInput(Task.DETECTION, phrases=phrases), GenerationParams(
            max_new_tokens=TOKENS, no_repeat_ngram_size=3, min_score=0.0))])[0]
        for item in line["asked"]:
            entity = next((e for e in answer.entities if e.phrase == item["phrase"]), None)
            assert item["scores"] == (list(entity.scores) if entity else [])
            assert item["boxes"] == ([[x1 * 240, y1 * 200, x2 * 240, y2 * 200] for x1, y1, x2, y2 in entity.boxes]
                                     if entity else [])
    assert sum(bool(item["boxes"]) for line in lines for item in line["asked"] if item["present"]) == 4
    assert table(result.output, "boxes' scores")[1:] == cocoeval(drawn / "truth.json", lines)
    assert table(result.output, "every score 1.0")[1:] == cocoeval(drawn / "truth.json", lines, constant=1.0)
    assert float(table(result.output, "boxes' scores")[2]) >= 50  # the demo model finds the shapes drawn here


def test_the_demo_model_on_held_out_scenes(shapes, detection_file, tmp_path):
    out = tmp_path / "shapes.jsonl"
    result = invoke("--model", "demo", "--benchmark", "detection", "--annotations", detection_file,
                    "--images", shapes.folder, "--out", out, "--max-new-tokens", TOKENS)
    assert result.exit_code == 0, result.output
    lines = read_lines(out)
    present = [max(i["scores"], default=0.0) for line in lines for i in line["asked"] if i["present"]]
    absent = [max(i["scores"], default=0.0) for line in lines for i in line["asked"] if i["present"] is False]
    assert len(absent) == 4 * len(lines) and len(present) == len(json.loads(detection_file.read_text())["annotations"])
    pairs = sum(1.0 if p > a else 0.5 if p == a else 0.0 for p in present for a in absent)
    auroc = pairs / (len(present) * len(absent))
    assert f"Score AUROC, present against absent phrases: {auroc:.3f}" in result.output
    assert auroc > 0.7  # scores part present phrases from absent ones (0.79 on these 10 scenes, 0.85 on 1,000)
    found = sum(any(v >= 0.5 for v in i["iou"]) for line in lines for i in line["asked"] if i["present"])
    assert table(result.output, "0.00 ")[2] == f"{100 * found / len(present):.2f}"
    assert found >= 0.8 * len(present)  # with every box kept, the demo model finds its objects (~92% referring)


@pytest.mark.parametrize(("args", "message"), [
    (("--benchmark", "detection", "--annotations", "{folder}/gone.json", "--images", "{folder}", "--model", "demo"),
     "Error: --annotations {folder}/gone.json: no such file."),
    (("--benchmark", "detection", "--annotations", "{folder}/empty.json", "--images", "{folder}", "--model", "demo"),
     ("Error: {folder}/empty.json has no categories: their names are the phrases each image is asked for; expected "
     "COCO-format ground truth")),
    (("--benchmark", "detection", "--annotations", "{folder}/truth.json", "--images", "{folder}", "--model", "demo",
      "--ontology", "{folder}/ontology.json"),
     ("Error: --ontology {folder}/ontology.json: 'a dog' is no category of {folder}/truth.json (its categories: "
     "'the red circle', 'the blue square', 'the green star').")),
    (("--benchmark", "detection", "--annotations", "{folder}/unknown.json", "--images", "{folder}", "--model", "demo"),
     "Error: {folder}/unknown.json: annotations[0]: category_id 8 is no category of the file."),
    (("--benchmark", "refcoco", "--annotations", "{folder}/truth.json", "--images", "{folder}", "--model", "demo"),
     ('Error: {folder}/truth.json: images[0] has no "caption" (a plain COCO file has none: score one with '
     "--benchmark detection)")),
    (("--benchmark", "refcoco", "--annotations", "{folder}/truth.json", "--images", "{folder}", "--model", "demo",
      "--ontology", "{folder}/ontology.json"), "Error: --ontology: only with --benchmark detection."),
])
def test_bad_input_is_one_line(drawn, tmp_path, args, message):
    truth = json.loads((drawn / "truth.json").read_text())
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    (tmp_path / "empty.json").write_text(json.dumps({**truth, "categories": []}))
    truth["annotations"][0]["category_id"] = 8
    (tmp_path / "unknown.json").write_text(json.dumps(truth))
    (tmp_path / "ontology.json").write_text(json.dumps({"a red circle": "the red circle", "a puppy": "a dog"}))
    result = invoke(*(a.format(folder=tmp_path) for a in args))
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(message.format(folder=tmp_path)), result.output


def test_without_pycocotools_the_run_stops_before_loading_the_model(drawn, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools.cocoeval", None)  # as if it were not installed
    result = invoke("--benchmark", "detection", "--annotations", drawn / "truth.json", "--images", drawn,
                    "--model", "no-such-model")
    assert result.exit_code == 1
    assert result.output.startswith("Error: --benchmark detection scores with pycocotools' COCOeval, which is not "
                                    'installed: pip install "pycocotools>=2.0.8".'), result.output
