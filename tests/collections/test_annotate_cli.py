"""`kosmos-serve annotate` in-process on the tiny model (and the demo model where real boxes matter)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kosmos_serve.cli import main
from kosmos_serve.cli.annotate import annotate_jobs
from kosmos_serve.collections.inputs import collect_images
from kosmos_serve.collections.records import RecordAppender, read_previous
from kosmos_serve.collections.runner import AnnotateRun
from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import GenerationParams, Request
from kosmos_serve.images import load_image
from kosmos_serve.tasks import TaskInput

EXAMPLES = Path(__file__).parents[2] / "examples"
TOKENS = 6


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread: the tiny model gains nothing from more, and a shared machine's cores stay free."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("KOSMOS_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def photos(tmp_path, sample_images):
    """photos/ with the three sample images (640x480, 300x200, 200x320) as PNG files."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for number, image in enumerate(sample_images):
        image.save(folder / f"{number}.png")
    return folder


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def annotate(out, *args, model):
    return invoke("annotate", *args, "--out", out, "--model", model, "--max-new-tokens", TOKENS)


def read(out):
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def expected_record(path: Path, result, model, min_score, classes=None, nms_iou=None):
    answer = result.to_dict()
    return {
        "path": str(path), "resolved": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "width": answer["image_size"][0], "height": answer["image_size"][1],
        **{key: answer[key] for key in ("task", "prompt", "text", "answer", "raw_text")},
        "entities": [{"phrase": e["phrase"], "class": (classes or {}).get(e["phrase"]), "span": e["span"],
                      "boxes": e["boxes"], "pixel_boxes": e["pixel_boxes"], "scores": e["scores"]}
                     for e in answer["entities"]],
        "markdown": answer["markdown"], "generated_tokens": answer["generated_tokens"], "model": str(model),
        "quantize": "none", "min_score": min_score, "nms_iou": nms_iou, "kosmos_serve_version": "0.1.0",
    }


def kept_at(entities, min_score):
    """Record entities with only their boxes scored `min_score` or more (entities left with none dropped)."""
    kept = []
    for entity in entities:
        keep = [index for index, score in enumerate(entity["scores"]) if score >= min_score]
        if keep:
            kept.append({**entity, **{key: [entity[key][i] for i in keep]
                                      for key in ("boxes", "pixel_boxes", "scores")}})
    return kept


def test_records_equal_the_engines_results(photos, tmp_path, tiny_model_dir, engine):
    out = tmp_path / "out.jsonl"
    result = annotate(out, photos, "--phrase", "a red car", "--phrase", "a dog", "--batch-size", 2,
                      model=tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("3 annotated, 0 skipped as already done, 0 failed; ")
    assert f"Records: {out}" in result.stdout
    paths = sorted(photos.iterdir())
    task = TaskInput("detection", phrases=("a red car", "a dog"))
    results = engine.run([Request(load_image(p), task, GenerationParams(max_new_tokens=TOKENS)) for p in paths])
    default, overlap = engine.defaults.min_score, engine.defaults.nms_iou
    assert read(out) == [expected_record(p, r, tiny_model_dir, default, nms_iou=overlap) for p, r in zip(paths, results)]
    assert "annotate:" not in result.output  # no progress bar when stderr is not a terminal


@pytest.mark.parametrize(
    "options, task",
    [
        ([], TaskInput("caption")),
        (["--task", "referring_generation", "--box", "10,20,150,160"],
         TaskInput("referring_generation", boxes=((10, 20, 150, 160),))),
        (["--task", "grounded_vqa", "--prompt", "What is red?"], TaskInput("grounded_vqa", prompt="What is red?")),
        (["--prompt", "<grounding> Describe this image:"],
         TaskInput("raw", prompt="<grounding> Describe this image:", grounding=False)),
    ],
)
def test_every_task_of_predict(photos, tmp_path, tiny_model_dir, engine, options, task):
    out = tmp_path / "out.jsonl"
    path = photos / "1.png"
    result = annotate(out, path, *options, model=tiny_model_dir)
    assert result.exit_code == 0, result.output
    default = engine.defaults.min_score  # annotate applies it to every task, not only detection
    expected = engine.predict(load_image(path), task, GenerationParams(max_new_tokens=TOKENS, min_score=default))
    assert read(out) == [expected_record(path, expected, tiny_model_dir, default)]


def test_boxes_under_the_engines_default_are_left_out_whatever_the_task(tmp_path, monkeypatch):
    def captions(out, *options):  # the demo model's grounded captions of the example scenes
        result = invoke("annotate", EXAMPLES, "--out", out, "--model", "demo", *options)
        assert result.exit_code == 0, result.output
        return read(out)

    every_box = captions(tmp_path / "every-box.jsonl", "--min-score", 0)
    assert {r["task"] for r in every_box} == {"caption"} and {r["min_score"] for r in every_box} == {0}
    scores = sorted({score for r in every_box for e in r["entities"] for score in e["scores"]})
    assert len(scores) >= 2, "the demo model's captions should give boxes of several scores"
    threshold = scores[len(scores) // 2]  # some boxes under it, some kept
    monkeypatch.setenv("KOSMOS_MIN_SCORE", str(threshold))  # the engine's default, as an operator sets it
    kept = captions(tmp_path / "out.jsonl")
    assert [r["min_score"] for r in kept] == [threshold] * len(every_box)
    assert [r["text"] for r in kept] == [r["text"] for r in every_box]  # the words stay, low boxes go
    assert [r["entities"] for r in kept] == [kept_at(r["entities"], threshold) for r in every_box]
    boxes = sum(len(e["scores"]) for r in kept for e in r["entities"])
    assert 0 < boxes < sum(len(e["scores"]) for r in every_box for e in r["entities"])


def test_a_file_is_continued_only_at_its_own_threshold(photos, tmp_path, tiny_model_dir):
    out = tmp_path / "out.jsonl"
    (photos / "2.png").rename(tmp_path / "later.png")
    assert annotate(out, photos, "--min-score", 0.2, model=tiny_model_dir).exit_code == 0
    before = out.read_bytes()
    (tmp_path / "later.png").rename(photos / "2.png")

    other = annotate(out, photos, "--min-score", 0.5, model=tiny_model_dir)  # refused before the model loads
    assert other.exit_code == 1
    assert other.stderr == (f"Error: --out {out} line 1 holds {photos / '0.png'} with boxes scored 0.2 or more, not "
                            "this run's min_score 0.5; give the same --min-score, or write to another --out (or move "
                            "that file away) to annotate afresh.\n")
    default = annotate(out, photos, model=tiny_model_dir)  # the default (0.002) is known once the engine is up
    assert default.exit_code == 1 and "not this run's min_score 0.002;" in default.stderr
    assert out.read_bytes() == before

    same = annotate(out, photos, "--min-score", 0.2, model=tiny_model_dir)
    assert same.stdout.startswith("1 annotated, 2 skipped as already done, 0 failed; ")
    assert [r["min_score"] for r in read(out)] == [0.2] * 3


def test_bad_images_get_error_lines_and_the_run_goes_on(photos, tmp_path, tiny_model_dir, monkeypatch):
    good = (photos / "0.png").read_bytes()
    (photos / "empty.png").write_bytes(b"")
    (photos / "text.png").write_bytes(b"this is not an image")
    (photos / "truncated.png").write_bytes(good[: len(good) // 3])
    Image.new("RGB", (700, 700)).save(photos / "large.png")
    manifest = tmp_path / "list.txt"
    manifest.write_text("photos/missing.png\n")
    monkeypatch.setenv("KOSMOS_MAX_IMAGE_PIXELS", "400000")
    out = tmp_path / "out.jsonl"
    result = annotate(out, photos, manifest, "--task", "referring_generation", "--box", "0,0,250,250",
                      model=tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("1 annotated, 0 skipped as already done, 7 failed; ")
    assert "counts as done: a re-run skips it" in result.stdout
    records = {record["path"].split("/")[-1]: record for record in read(out)}
    errors = {name: record["error"]["code"] for name, record in records.items() if "error" in record}
    assert errors == {"1.png": "invalid_box", "2.png": "invalid_box", "empty.png": "invalid_image",
                      "text.png": "invalid_image", "truncated.png": "invalid_image", "large.png": "image_too_large",
                      "missing.png": "invalid_image"}
    assert records["0.png"]["entities"][0]["phrase"] == "It"
    assert records["truncated.png"]["error"]["message"] == "The image is truncated or corrupt; send the complete file."
    assert records["large.png"]["error"]["message"].startswith("The image is 700x700 = 490,000 pixels, over the cap")
    missing = records["missing.png"]
    assert missing == {"path": "photos/missing.png", "resolved": str(photos / "missing.png"), "sha256": None,
                       "width": None, "height": None, "task": "referring_generation",
                       "error": {"code": "invalid_image",
                                 "message": "The image file cannot be read (no such file or directory)."},
                       "model": str(tiny_model_dir), "kosmos_serve_version": "0.1.0"}
    assert records["1.png"]["sha256"] == hashlib.sha256((photos / "1.png").read_bytes()).hexdigest()
    again = annotate(out, photos, manifest, "--task", "referring_generation", "--box", "0,0,250,250",
                     model=tiny_model_dir)
    assert again.stdout.startswith("0 annotated, 8 skipped as already done, 0 failed; ")
    assert len(read(out)) == 8


def test_a_second_run_skips_what_is_done_and_annotates_new_and_changed_images(photos, tmp_path, tiny_model_dir,
                                                                               sample_images):
    out = tmp_path / "out.jsonl"
    (photos / "2.png").rename(tmp_path / "later.png")
    assert annotate(out, photos, model=tiny_model_dir).exit_code == 0
    (tmp_path / "later.png").rename(photos / "2.png")
    sample_images[2].transpose(Image.Transpose.ROTATE_90).save(photos / "1.png")  # changed since: its digest is new
    result = annotate(out, photos, model=tiny_model_dir)
    assert result.stdout.startswith("2 annotated, 1 skipped as already done, 0 failed; ")
    records = read(out)
    assert [r["path"].split("/")[-1] for r in records] == ["0.png", "1.png", "1.png", "2.png"]
    assert len({(r["resolved"], r["sha256"]) for r in records}) == 4
    assert records[2]["width"] == 320  # the rotated image


def test_a_torn_last_line_is_dropped_and_its_image_done_again(photos, tmp_path, tiny_model_dir):
    out = tmp_path / "out.jsonl"
    assert annotate(out, photos, model=tiny_model_dir).exit_code == 0
    complete = read(out)
    data = out.read_bytes()
    out.write_bytes(data[: data.rindex(b"\n", 0, -1) + 40])  # killed while writing the last line
    result = annotate(out, photos, model=tiny_model_dir)
    assert result.stdout.startswith("1 annotated, 2 skipped as already done, 0 failed; ")
    assert read(out) == complete


def test_an_ontology_gives_each_entity_its_class(tmp_path):
    ontology = tmp_path / "ontology.json"
    classes = {"the blue circle": "circle", "the purple triangle": "triangle", "a green star": "star"}
    ontology.write_text(json.dumps(classes))
    out = tmp_path / "out.jsonl"
    image = EXAMPLES / "scene-four-shapes.png"
    result = annotate(out, image, "--ontology", ontology, model="demo")
    assert result.exit_code == 0, result.output
    [record] = read(out)
    assert record["task"] == "detection"
    assert record["prompt"] == ("<grounding><phrase> the blue circle</phrase>\n<grounding><phrase> the purple "
                                "triangle</phrase>\n<grounding><phrase> a green star</phrase>")
    assert [e["class"] for e in record["entities"]] == [classes[e["phrase"]] for e in record["entities"]]
    circle = next(e for e in record["entities"] if e["class"] == "circle")
    assert circle["pixel_boxes"] == [[132, 9, 225, 88]]  # README: the true box is 134,0,221,87


def test_without_an_ontology_the_class_is_null_and_other_tasks_keep_it_for_matching_phrases(tmp_path):
    ontology = tmp_path / "ontology.json"
    ontology.write_text('{"the blue circle": "circle"}')
    out = tmp_path / "out.jsonl"
    image = EXAMPLES / "scene-four-shapes.png"
    args = ["--task", "referring_comprehension", "--no-repeat-ngram-size", 0]
    assert annotate(out, image, *args, "--ontology", ontology, model="demo").exit_code == 0
    assert [(e["phrase"], e["class"]) for e in read(out)[0]["entities"]] == [("the blue circle", "circle")]
    plain = tmp_path / "plain.jsonl"
    assert annotate(plain, image, *args, "--phrase", "the blue circle", model="demo").exit_code == 0
    assert [(e["phrase"], e["class"]) for e in read(plain)[0]["entities"]] == [("the blue circle", None)]


def test_a_jsonl_manifest_gives_an_image_its_own_phrases(tmp_path):
    manifest = tmp_path / "items.jsonl"
    manifest.write_text(json.dumps({"image": str(EXAMPLES / "scene-four-shapes.png"), "phrases": ["the blue circle"]})
                        + "\n" + json.dumps({"image": str(EXAMPLES / "scene-three-shapes.png")}) + "\n")
    out = tmp_path / "out.jsonl"
    result = annotate(out, manifest, "--phrase", "a red square", model="demo")
    assert result.exit_code == 0, result.output
    assert [r["prompt"] for r in read(out)] == ["<grounding><phrase> the blue circle</phrase>",
                                                "<grounding><phrase> a red square</phrase>"]


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda d: (d / "empty").mkdir(), ["{d}/empty"], "No images found in"),
        (lambda d: (d / "items.jsonl").write_text('{"image": "photos/0.png"}\n{"image": 3}\n'), ["{d}/items.jsonl"],
         'items.jsonl line 2 has no "image"'),
        (lambda d: (d / "items.jsonl").write_text('{"image": "photos/0.png", "phrases": ["a dog"]}\n'),
         ["{d}/items.jsonl", "--task", "caption"], "items.jsonl line 1: --task caption does not use --phrase"),
        (lambda d: (d / "out.jsonl").write_text('{"image": "a.png", "caption": "a dog"}\n'), ["{d}/photos"],
         'is not the records of an earlier annotate run (line 1: it has no "path")'),
        (lambda d: (d / "o.json").write_text('["a red car"]'), ["{d}/photos", "--ontology", "{d}/o.json"],
         "must be a JSON object mapping each prompt phrase to a class name"),
        (lambda d: (d / "o.json").write_text('{"a car": "car"}'),
         ["{d}/photos", "--ontology", "{d}/o.json", "--phrase", "a dog"], "either with --phrase or in --ontology"),
        (None, ["{d}/photos", "--task", "detection"], "needs at least one phrase"),
        (None, ["{d}/photos", "--box", "1,2"], "is not a box"),
        (None, ["{d}/nowhere.png"], "no such file or folder"),
        (None, ["{d}/photos", "--min-score", "2"], "--min-score: Input should be less than or equal to 1"),
        (None, ["{d}/photos", "--min-score", "nan"], "--min-score: Input should be a finite number"),
    ],
)
def test_bad_input_is_one_message_exit_1_and_nothing_written(photos, tmp_path, tiny_model_dir, setup, args, message):
    if setup:
        setup(tmp_path)
    out = tmp_path / "out.jsonl"
    before = out.read_bytes() if out.exists() else None
    result = annotate(out, *[str(a).format(d=tmp_path) for a in args], model=tiny_model_dir)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and message in result.stderr and result.stdout == ""
    assert "Traceback" not in result.output
    assert (out.read_bytes() if out.exists() else None) == before


def test_a_min_score_that_is_no_number_is_a_usage_error(photos, tmp_path, tiny_model_dir):
    out = tmp_path / "out.jsonl"
    result = annotate(out, photos, "--min-score", "abc", model=tiny_model_dir)
    assert result.exit_code == 2  # click's code for a bad option, as for --batch-size 0
    assert "Invalid value for '--min-score': 'abc' is not a valid float." in result.stderr
    assert not out.exists()


def test_an_output_of_another_command_is_not_continued(photos, tmp_path, tiny_model_dir):
    out = tmp_path / "out.jsonl"
    assert annotate(out, photos, "--phrase", "a dog", model=tiny_model_dir).exit_code == 0
    before = out.read_bytes()
    result = annotate(out, photos, "--phrase", "a cat", model=tiny_model_dir)
    assert result.exit_code == 1
    assert "with prompt '<grounding><phrase> a dog</phrase>', not this command's" in result.stderr
    assert "write to another --out" in result.stderr
    assert out.read_bytes() == before


def test_the_progress_bar_shows_images_per_second_and_time_left(photos, tmp_path, tiny_model_dir, engine, capsys):
    settings = EngineSettings(model=str(tiny_model_dir))
    params = GenerationParams(max_new_tokens=2)
    jobs = annotate_jobs(collect_images([str(photos)]), settings, params, None, None, (), (), False, None)
    out = tmp_path / "out.jsonl"
    with RecordAppender(out, read_previous(out)) as appender:
        summary = AnnotateRun(engine, appender, set(), params=params, model="tiny", batch_size=2,
                              show_progress=True).run(jobs)
    assert summary.annotated == 3
    bar = capsys.readouterr().err
    assert "annotate: 100%" in bar and "3/3" in bar and "img/s" in bar and "<00:00" in bar


def test_width_and_height_are_as_a_viewer_sees_the_image(tmp_path, tiny_model_dir):
    path = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to show it
    Image.new("RGB", (60, 40), "red").save(path, exif=exif)
    out = tmp_path / "out.jsonl"
    assert annotate(out, path, model=tiny_model_dir).exit_code == 0
    assert [(r["width"], r["height"]) for r in read(out)] == [(40, 60)]


def test_a_detection_file_is_continued_only_at_its_own_overlap(photos, tmp_path, tiny_model_dir):
    out = tmp_path / "out.jsonl"
    (photos / "2.png").rename(tmp_path / "later.png")
    assert annotate(out, photos, "--phrase", "a cat", model=tiny_model_dir).exit_code == 0
    assert {record["nms_iou"] for record in read(out)} == {0.5}  # detection's default, said in every record
    before = out.read_bytes()
    (tmp_path / "later.png").rename(photos / "2.png")

    other = annotate(out, photos, "--phrase", "a cat", "--nms-iou", 1, model=tiny_model_dir)  # before the model loads
    assert other.exit_code == 1
    assert other.stderr == (f"Error: --out {out} line 1 holds {photos / '0.png'} with boxes that no likelier phrase's "
                            "box overlapped by more than 0.5, not this run's nms_iou 1.0; give the same --nms-iou, "
                            "or write to another --out (or move that file away) to annotate afresh.\n")
    assert out.read_bytes() == before
    assert annotate(out, photos, "--phrase", "a cat", "--nms-iou", 0.5, model=tiny_model_dir).exit_code == 0
    assert len(read(out)) == len(list(photos.iterdir()))
