"""Each benchmark end to end on the demo model over synthetic scenes written in MDETR's formats.

The figures are known independently: the RefCOCO-format run must find exactly the referring hits that `evaluate`
(the project's own scorer, on the same scenes' JSONL records) finds, once its predictions are held to the same,
grid-quantised truth that `evaluate` uses; the Flickr30k-format run must agree with the engine asked the original
prompts directly, built here from the JSONL records.
"""

import json
import re
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from kosmos_serve.cli import main
from kosmos_serve.engine import GenerationParams, Request
from kosmos_serve.evaluation.backends import LocalBackend
from kosmos_serve.evaluation.datasets import read_splits
from kosmos_serve.evaluation.report import no_image_found
from kosmos_serve.evaluation.runner import PredictionLog, Settings, run
from kosmos_serve.evaluation.synthetic import flickr_style, shape_of
from kosmos_serve.grounding import iou
from kosmos_serve.tasks import Task, TaskInput
from kosmos_serve.training.evaluate import evaluate, true_entities
from kosmos_serve.training.records import read_examples

PARAMS = GenerationParams(max_new_tokens=24, no_repeat_ngram_size=3)  # the 3-gram rule: the original evaluation's


def invoke(*args):
    return CliRunner().invoke(main, ["evaluate", *(str(a) for a in args)], catch_exceptions=False)


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def table_row(output: str, first_cells: str) -> list[str]:
    return next(line.split() for line in output.splitlines() if re.match(rf"{re.escape(first_cells)}\s", line))


def test_refcoco_format_run_finds_what_evaluate_finds(shapes, demo_engine, tmp_path):
    out = tmp_path / "refcoco.jsonl"
    result = invoke("--model", "demo", "--benchmark", "refcoco", "--annotations", shapes.refcoco,
                    "--images", shapes.folder, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"Predictions: {out} (" in result.output  # the file it wrote, named
    lines = read_lines(out)
    referring = [e for e in read_examples(shapes.records) if e.kind == "referring"]
    assert len(lines) == len(referring) > 20
    known = evaluate(demo_engine, referring)["referring"]

    quantised_hits = 0
    for line, example in zip(lines, referring):
        phrase, (truth, *_) = true_entities(example)[0]
        assert line["phrase"] == phrase and line["prompt"] == f"<grounding><phrase>{phrase}</phrase>"
        width, height = Image.open(example.image_path).size
        first = [(b[0] / width, b[1] / height, b[2] / width, b[3] / height) for b in line["boxes"][:1]]
        quantised_hits += bool(first) and iou(first[0], truth) >= 0.5
        assert line["hit"] == (bool(line["iou"]) and line["iou"][0] >= 0.5)
    assert quantised_hits == known.hits  # the same predictions; only the truth differs (exact pixels here)

    accuracy = 100 * sum(line["hit"] for line in lines) / len(lines)
    assert table_row(result.output, "refcoco    synthetic") == ["refcoco", "synthetic", f"{accuracy:.2f}", "-",
                                                                str(len(lines)), "0"]
    assert accuracy >= 80  # the demo model grounds (~92% on held-out scenes)


def test_flickr30k_format_run_agrees_with_the_engine_asked_directly(shapes, demo_engine, tmp_path):
    out = tmp_path / "flickr.jsonl"
    result = invoke("--model", "demo", "--benchmark", "flickr30k", "--annotations", shapes.flickr30k,
                    "--images", shapes.folder, "--flickr-entities", shapes.flickr_entities, "--out", out,
                    "--max-new-tokens", PARAMS.max_new_tokens)
    assert result.exit_code == 0, result.output

    requests, asked = [], []  # the original prompts, built here from the JSONL records
    for record in (json.loads(line) for line in shapes.records.read_text().splitlines()):
        if "caption" not in record:
            continue
        image = Image.open(shapes.folder / record["image"]).convert("RGB")
        caption, spans = flickr_style(record["caption"], record["spans"])
        for (start, end), span in zip(spans, record["spans"]):
            prompt = f"<grounding>{caption[:start]} <phrase>{caption[start:end]}</phrase>"
            requests.append(Request(image, TaskInput(Task.RAW, prompt=prompt, grounding=False), PARAMS))
            truth = [(x1 / image.width, y1 / image.height, x2 / image.width, y2 / image.height)
                     for x1, y1, x2, y2 in span["boxes"]]
            asked.append((caption[start:end], truth))
    expected, by_shape = [], {}
    for (phrase, truth), answer in zip(asked, demo_engine.run(requests)):
        boxes = [b for e in answer.entities if e.phrase == phrase for b in e.boxes]
        expected.append(bool(boxes) and max(iou(boxes[0], t) for t in truth) >= 0.5)
        by_shape.setdefault(shape_of(phrase), []).append(expected[-1])

    lines = read_lines(out)
    assert [line["hit"] for line in lines] == expected
    assert table_row(result.output, "flickr30k  synthetic  all")[3] == f"{100 * sum(expected) / len(expected):.2f}"
    for shape, hits in by_shape.items():
        row = table_row(result.output, f"flickr30k  synthetic  {shape}")
        assert row[3] == f"{100 * sum(hits) / len(hits):.2f}" and row[9] == str(len(hits))


def test_a_missing_image_is_counted_listed_and_skipped(shapes, tmp_path):
    data = json.loads(shapes.refcoco.read_text())
    data["images"][1]["file_name"] = "images/gone.png"
    annotations = tmp_path / "finetune_refcoco_val.json"
    annotations.write_text(json.dumps(data))
    result = invoke("--model", "demo", "--benchmark", "refcoco", "--annotations", annotations, "--images",
                    shapes.folder, "--limit", 6)
    assert result.exit_code == 0, result.output
    assert table_row(result.output, "refcoco    val")[-2:] == ["5", "1"]  # scored, skipped
    assert "refcoco val: a sample of 6 of " in result.output
    assert "refcoco val: 1 examples skipped, not scored (1 images): image not found: " in result.output
    assert "gone.png" in result.output


def test_the_folder_of_the_images_works_as_well_as_the_one_their_names_are_relative_to(shapes):
    assert json.loads(shapes.refcoco.read_text())["images"][0]["file_name"].startswith("images/")
    result = invoke("--model", "demo", "--benchmark", "refcoco", "--annotations", shapes.refcoco, "--images",
                    shapes.folder / "images", "--limit", 3, "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    assert table_row(result.output, "refcoco    synthetic")[-2:] == ["3", "0"]  # scored, skipped


def test_with_no_image_found_the_report_says_where_it_looked_and_what_to_pass(shapes):
    images = shapes.folder.parent
    first = read_splits("refcoco", [shapes.refcoco], images, limit=2)[0].examples[0].file_name
    result = invoke("--model", "demo", "--benchmark", "refcoco", "--annotations", shapes.refcoco, "--images", images,
                    "--limit", 2)
    assert result.exit_code == 0, result.output
    assert (f"refcoco synthetic: no image was found under --images {images}; the first, {first}, was looked for at "
            f"{images / first}. --images should be the folder that {first} is relative to, or the images/ folder in "
            "it.\n") in result.output


def test_a_coco_2014_name_is_looked_for_in_its_own_folder_first():
    assert no_image_found(Path("coco"), "COCO_val2014_000000000042.jpg") == (
        "no image was found under --images coco; the first, COCO_val2014_000000000042.jpg, was looked for at "
        "coco/val2014/COCO_val2014_000000000042.jpg and coco/COCO_val2014_000000000042.jpg. --images should be the "
        "folder that holds COCO_val2014_000000000042.jpg, or the one with val2014/ in it.")


@pytest.mark.parametrize(("args", "message"), [
    (("--benchmark", "refcoco", "--annotations", "{flickr}", "--images", "{folder}", "--model", "demo"),
     "Error: {flickr} is MDETR's Flickr30k Entities file; score it with --benchmark flickr30k."),
    (("--benchmark", "refclef", "--annotations", "{flickr}", "--images", "{folder}", "--model", "demo"),
     "Error: Unknown benchmark 'refclef'; choose one of: refcoco, refcoco+, refcocog, flickr30k, detection, ocr."),
    (("--benchmark", "flickr30k", "--annotations", "{records}", "--images", "{folder}", "--model", "demo"),
     "Error: {records} is not JSON: Extra data: line 2 column 1 (char 359); expected MDETR's Flickr30k Entities file"),
    (("--benchmark", "refcoco", "--annotations", "{flickr}", "--images", "{folder}"),
     "Error: --benchmark needs --model (run here) or --url (a running service), one of them."),
    (("--model", "demo", "--data", "{records}", "--limit", "5"), "Error: --limit: only with --benchmark NAME."),
])
def test_bad_input_is_one_line(shapes, args, message):
    names = {"flickr": shapes.flickr30k, "folder": shapes.folder, "records": shapes.records}
    result = invoke(*(a.format(**names) for a in args))
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(message.format(**names)), result.output


class CountingBackend(LocalBackend):
    """The local backend, counting the prompts it runs; it sends SIGINT to this process at batch `interrupt_at`."""

    def __init__(self, engine, params, interrupt_at=None):
        super().__init__(engine, params)
        self.prompts, self.batches, self.interrupt_at = 0, 0, interrupt_at

    def generate(self, examples):
        self.batches += 1
        if self.batches == self.interrupt_at:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: this batch finishes and is written, then the run stops
        self.prompts += len(examples)
        return super().generate(examples)


def test_an_interrupted_run_continues_without_rerunning_finished_examples(shapes, demo_engine, tmp_path):
    splits = read_splits("refcoco", [shapes.refcoco], shapes.folder)
    params = GenerationParams(max_new_tokens=16, no_repeat_ngram_size=3)
    settings = Settings("demo", 16, 3)
    total = len(splits[0].examples)

    whole = tmp_path / "whole.jsonl"
    run(splits, CountingBackend(demo_engine, params), PredictionLog(whole, settings), batch_size=4)

    out = tmp_path / "interrupted.jsonl"
    first = CountingBackend(demo_engine, params, interrupt_at=2)
    outcome = run(splits, first, PredictionLog(out, settings), batch_size=4)
    assert outcome.interrupted and first.prompts == 8 and len(read_lines(out)) == 8
    with open(out, "ab") as file:  # and a kill mid-write: a torn last line
        file.write(b'{"benchmark": "refcoco", "annotations": "finetune_refcoco_synth')

    second = CountingBackend(demo_engine, params)
    outcome = run(splits, second, PredictionLog(out, settings), batch_size=4)
    assert not outcome.interrupted and second.prompts == total - 8
    assert outcome.results[0].resumed == 8 and len(outcome.results[0].records) == total
    assert read_lines(out) == read_lines(whole)  # every example once, as an uninterrupted run writes it

    third = CountingBackend(demo_engine, params)
    run(splits, third, PredictionLog(out, settings), batch_size=4)
    assert third.prompts == 0


def test_predictions_of_other_settings_are_not_mixed_in(shapes, tmp_path):
    out = tmp_path / "p.jsonl"
    other = {"benchmark": "refcoco", "annotations": "a.json", "key": "0", "hit": True, "model": "tiny",
             "max_new_tokens": 16, "no_repeat_ngram_size": 0, "ground_truth": "mdetr"}  # another file: left alone
    line = {"benchmark": "refcoco", "annotations": shapes.refcoco.name, "key": "0", "hit": True, "model": "demo",
            "max_new_tokens": 16, "no_repeat_ngram_size": 0, "ground_truth": "mdetr"}
    out.write_text(json.dumps(other) + "\n" + json.dumps(line) + "\n")
    result = invoke("--model", "demo", "--benchmark", "refcoco", "--annotations", shapes.refcoco, "--images",
                    shapes.folder, "--out", out, "--max-new-tokens", 16)
    assert result.exit_code == 1
    assert "line 2 was made with no_repeat_ngram_size 0, not this run's 3" in result.output


def test_each_image_is_encoded_once_for_all_its_phrases(shapes):
    """Flickr30k asks several phrases of one image: the engine's feature cache encodes each image once."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine

    engine = Engine(EngineSettings(model="demo", max_batch_rows=4))
    splits = read_splits("flickr30k", [shapes.flickr30k], shapes.folder)
    outcome = run(splits, LocalBackend(engine, PARAMS), PredictionLog(None, Settings("demo", 24, 3)), batch_size=4)
    images = {example.image_path for example in splits[0].examples}
    assert len(outcome.results[0].records) == len(splits[0].examples) > len(images)
    assert engine.cache.misses == len(images)  # one vision pass per image, every other phrase from the cache
