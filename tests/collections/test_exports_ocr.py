"""Kosmos-2.5's readings through annotate and export: records carry every line read (text, corners, box), and each
format holds them (COCO annotations with the text in `attributes`, Label Studio's OCR template checked by its own
SDK, one text or markdown file per image).

A random model writes no lines, so the records here are hand-written readings parsed by the production parser.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from records_for_export import export, invoke, write_records
from test_exports_label_studio import label_studio_errors, label_studio_python  # noqa: F401  (a fixture)

from kosmos_serve.cli import main
from kosmos_serve.collections.inputs import ImageEntry
from kosmos_serve.collections.records import annotated_record
from kosmos_serve.engine import GenerationParams, Request
from kosmos_serve.engine.results import Result, Timings
from kosmos_serve.images import load_image
from kosmos_serve.ocr import parse_reading, resized_size
from kosmos_serve.tasks import Task, TaskInput

TOKENS = 6
RECEIPT = ("scans/receipt.png", 500, 160)
MENU = ("scans/more/menu.png", 300, 200)


def reading(width, height, texts):
    """An `<ocr>` reading of a `width` x `height` page: each text a line in a box of its own, one under the other."""
    resized_width, resized_height = resized_size(width, height)
    step = resized_height // (len(texts) + 1)
    boxes = [f"<bbox><x_{10 + row}><y_{step * row + 4}><x_{resized_width - 20}><y_{step * (row + 1)}></bbox>"
             for row in range(len(texts))]
    return "<ocr>" + "".join(f"{box}{text}\n" for box, text in zip(boxes, texts))


LINE_SCORES = (0.91, 0.42, 0.77)  # what the engine's line scoring gave each line, as annotate records it


def ocr_record(root, path, width, height, texts):
    """The record annotate writes for a reading of the page at `path` (an image of that size written under root)."""
    image = root / path
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), "white").save(image)
    parsed = parse_reading(reading(width, height, texts), "<ocr>", width, height)
    lines = tuple(dataclasses.replace(line, score=score) for line, score in zip(parsed.lines, LINE_SCORES))
    result = Result(task=Task.OCR, prompt="<ocr>", text=parsed.text, answer=parsed.answer, raw_text=parsed.raw_text,
                    entities=(), markdown=parsed.markdown, image_size=(width, height), generated_tokens=40,
                    image_cached=False, timings=Timings(), lines=lines)
    return annotated_record(ImageEntry(path, image, path), "ab" * 32, result, model="kosmos-2.5-folder",
                            quantize="none", min_score=None)


@pytest.fixture
def records(tmp_path):
    return [ocr_record(tmp_path, *RECEIPT, ["RECEIPT 0008", "1 BLACK SAKURA 45,455", "Total 50,000"]),
            ocr_record(tmp_path, *MENU, ["MENU", "Coffee, black"])]


@pytest.fixture
def records_file(tmp_path, records):
    return write_records(tmp_path / "pages.jsonl", records)


def test_an_ocr_record_carries_each_line_after_the_markdown(records):
    receipt = records[0]
    assert list(receipt)[list(receipt).index("markdown") + 1] == "lines"
    assert [line["text"] for line in receipt["lines"]] == ["RECEIPT 0008", "1 BLACK SAKURA 45,455", "Total 50,000"]
    first = receipt["lines"][0]
    x1, y1, x2, y2 = first["box"]
    assert first["corners"] == [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]
    assert receipt["text"] == "RECEIPT 0008\n1 BLACK SAKURA 45,455\nTotal 50,000\n"


@pytest.mark.parametrize("task", ["ocr", "markdown", None])
def test_annotate_writes_what_the_engine_reads(tmp_path, tiny_kosmos25_dir, kosmos25_engine, task, monkeypatch):
    """Each task's record is the engine's answer; with no --task, a Kosmos-2.5 (no caption) does its first task, ocr."""
    monkeypatch.setenv("KOSMOS_THREADS", "1")
    threads = torch.get_num_threads()
    path = tmp_path / "page.png"
    Image.effect_mandelbrot((320, 200), (-2.0, -1.5, 1.0, 1.5), 40).convert("RGB").save(path)
    out = tmp_path / "out.jsonl"
    chosen = ["--task", task] if task else []
    result = CliRunner().invoke(main, ["annotate", str(path), "--out", str(out), "--model", str(tiny_kosmos25_dir),
                                       *chosen, "--max-new-tokens", str(TOKENS)], catch_exceptions=False)
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    task = task or "ocr"
    params = GenerationParams(max_new_tokens=TOKENS, min_score=kosmos25_engine.defaults.min_score)
    expected = kosmos25_engine.run([Request(load_image(path), TaskInput(task), params)])[0].to_dict()
    assert {key: record[key] for key in ("task", "prompt", "text", "raw_text", "markdown", "entities")} == {
        key: expected[key] for key in ("task", "prompt", "text", "raw_text", "markdown", "entities")}
    assert record.get("lines") == expected.get("lines")
    assert ("lines" in record) == (task == "ocr")


def test_coco_annotations_hold_each_line_with_its_text(records_file, records):
    from pycocotools.coco import COCO

    coco, summary = export(records_file, "coco")
    assert summary.startswith(f"wrote {records_file.parent / 'coco.json'} (coco): 2 images, 0 boxes, 5 lines, ")
    assert "scored" not in summary  # every line carries its own score
    assert coco["info"]["description"] == "Kosmos-2.5 text lines (kosmos-2.5-folder) exported by kosmos-serve"
    assert coco["categories"] == [{"id": 1, "name": "Text", "supercategory": "object"}]
    loaded = COCO(str(records_file.parent / "coco.json"))
    by_name = {image["file_name"]: image["id"] for image in coco["images"]}
    assert sorted(by_name) == ["more/menu.png", "receipt.png"]
    for record in records:
        name = record["path"].removeprefix("scans/")
        annotations = loaded.loadAnns(loaded.getAnnIds(imgIds=[by_name[name]]))
        assert [a["attributes"]["text"] for a in annotations] == [line["text"] for line in record["lines"]]
        for annotation, line in zip(annotations, record["lines"]):
            x1, y1, x2, y2 = line["box"]
            assert annotation["bbox"] == [x1, y1, x2 - x1, y2 - y1] and annotation["score"] == line["score"]
            assert annotation["segmentation"] == [[v for corner in line["corners"] for v in corner]]
            assert loaded.annToMask(annotation).sum() == pytest.approx(annotation["area"], rel=0.1)


def test_lines_of_records_without_scores_export_with_score_1(tmp_path, records):
    for record in records:
        for line in record["lines"]:
            del line["score"]
    coco, summary = export(write_records(tmp_path / "unscored.jsonl", records), "coco")
    assert "scored 5 lines 1.0 (the records carry no line scores)" in summary
    assert {annotation["score"] for annotation in coco["annotations"]} == {1.0}


def test_label_studio_gets_a_rectangle_and_a_transcription_per_line(records_file, records):
    tasks, _ = export(records_file, "label-studio", "--image-root", "http://files/")
    receipt = tasks[1]  # sorted by name: more/menu.png, receipt.png
    assert receipt["data"] == {"image": "http://files/receipt.png"}
    [prediction] = receipt["predictions"]
    assert prediction["model_version"] == "kosmos-2:kosmos-2.5-folder"
    assert prediction["score"] == round(sum(LINE_SCORES) / 3, 4)  # each line once, its transcription aside
    regions = prediction["result"]
    assert len(regions) == 6
    for number, (rectangle, transcription) in enumerate(zip(regions[::2], regions[1::2]), start=1):
        line = records[0]["lines"][number - 1]
        x1, y1, x2, y2 = line["box"]
        place = {"x": 100 * x1 / 500, "y": 100 * y1 / 160, "width": 100 * (x2 - x1) / 500,
                 "height": 100 * (y2 - y1) / 160, "rotation": 0}
        common = {"id": f"kosmos-2-{number}", "to_name": "image", "original_width": 500, "original_height": 160,
                  "image_rotation": 0, "score": line["score"]}
        assert rectangle == {**common, "type": "rectanglelabels", "from_name": "label",
                             "value": {**place, "rectanglelabels": ["Text"]}}
        assert transcription == {**common, "type": "textarea", "from_name": "transcription",
                                 "value": {**place, "text": [line["text"]]}}


def test_label_studio_ocr_tasks_pass_label_studios_own_validation(records_file, label_studio_python):  # noqa: F811
    config_path = records_file.parent / "config.xml"
    tasks, _ = export(records_file, "label-studio", "--label-config", config_path)
    config = config_path.read_text()
    assert '<TextArea name="transcription" toName="image" editable="true" perRegion="true"' in config
    assert '<Label value="Text"/>' in config
    without_transcription = "\n".join(line for line in config.splitlines() if "<TextArea" not in line)
    ours, unchecked = label_studio_errors(label_studio_python, (config, tasks), (without_transcription, tasks))
    assert ours == []
    assert unchecked and all("transcription" in error for error in unchecked)  # the validator does read them


def test_text_and_markdown_write_one_file_per_image(records_file, records):
    for format_name, suffix, field in (("text", ".txt", "text"), ("markdown", ".md", "markdown")):
        out = records_file.parent / f"{format_name}-pages"
        result = invoke(records_file, "--format", format_name, "--out", out)
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"wrote {out} ({format_name}): 2 images, 0 boxes, 5 lines, ")
        files = sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())
        assert files == [f"more/menu{suffix}", f"receipt{suffix}"]
        for record in records:
            name = Path(record["path"]).relative_to("scans").with_suffix(suffix)
            text = (out / name).read_text(encoding="utf-8")
            assert text == record[field] + ("" if record[field].endswith("\n") else "\n")
    assert (records_file.parent / "markdown-pages" / "receipt.md").read_text().startswith("[RECEIPT 0008](#box=")


def test_pages_that_would_share_a_file_or_an_out_that_is_a_file_are_refused(tmp_path, records):
    twin = ocr_record(tmp_path, "scans/receipt.jpg", 500, 160, ["another receipt"])
    records_file = write_records(tmp_path / "pages.jsonl", [*records, twin])
    result = invoke(records_file, "--format", "text", "--out", tmp_path / "pages")
    assert (result.exit_code, result.output) == (
        1, ("Error: receipt.jpg and receipt.png would both be written to receipt.txt; rename one, or export them "
            "apart.\n"))
    assert not (tmp_path / "pages").exists()
    result = invoke(records_file, "--format", "markdown", "--out", records_file)
    assert result.output == f"Error: --out {records_file} is a file; --format markdown writes a folder of one file " \
                            "per image.\n"
    result = invoke(records_file, "--format", "coco", "--out", tmp_path)
    assert result.output == f"Error: --out {tmp_path} is a folder; --format coco writes one file.\n"


def test_a_line_outside_its_image_is_named(tmp_path, records):
    records[0]["lines"][1]["box"][2] = 900
    records_file = write_records(tmp_path / "pages.jsonl", records)
    result = invoke(records_file, "--format", "coco", "--out", tmp_path / "coco.json")
    assert result.exit_code == 1
    assert "line 1 is not an annotation record: line 1: box [" in result.output
    assert "lies outside the 500x160 image" in result.output


def test_supervision_detections_hold_each_line_as_a_text_box(records):
    from kosmos_serve.exports import to_detections

    receipt = records[0]
    parsed = parse_reading(reading(500, 160, ["RECEIPT 0008", "1 BLACK SAKURA 45,455", "Total 50,000"]), "<ocr>",
                           500, 160)
    result = Result(task=Task.OCR, prompt="<ocr>", text=parsed.text, answer=parsed.answer, raw_text=parsed.raw_text,
                    entities=(), markdown=parsed.markdown, image_size=(500, 160), generated_tokens=40,
                    image_cached=False, timings=Timings(), lines=parsed.lines)
    for source in (receipt, result, result.to_dict()):
        detections = to_detections(source)
        assert detections.xyxy.tolist() == [line["box"] for line in receipt["lines"]]
        assert detections.data["class_name"].tolist() == ["Text"] * 3
        assert detections.data["phrase"].tolist() == [line["text"] for line in receipt["lines"]]
        assert detections.confidence.tolist() == pytest.approx([line.get("score", 0.0) for line in
                                                                (source.to_dict() if isinstance(source, Result)
                                                                 else source)["lines"]])
    assert to_detections(receipt, classes=["Text"]).class_id.tolist() == [0, 0, 0]
