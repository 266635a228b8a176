"""The command line, run in-process on the tiny model."""

import json

import pytest
import torch
from cli_invocation import invoke

from kosmos_serve.training.train import STATE_FILE


def test_predict_prints_text_then_entities(image_file, tiny_model_dir):
    result = invoke("predict", image_file, "--model", tiny_model_dir, "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{image_file} (640x480)"
    assert lines[1].startswith("  An image of")


def test_predict_json_equals_the_library_result(image_file, tiny_model_dir, engine, sample_images):
    from kosmos_serve.engine import GenerationParams
    from kosmos_serve.tasks import TaskInput

    result = invoke("predict", image_file, image_file, "--model", tiny_model_dir, "--json", "--task",
                    "region_vqa", "--prompt", "Where is the fire next to?", "--phrase", "the fire",
                    "--box", "5,5,120,90", "--max-new-tokens", 10)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    expected = engine.predict(
        sample_images[0],
        TaskInput("region_vqa", prompt="Where is the fire next to?", phrases=("the fire",), boxes=((5, 5, 120, 90),)),
        GenerationParams(max_new_tokens=10),
    ).to_dict()
    assert len(payload) == 2
    for item in payload:
        assert item["image"] == str(image_file)
        assert {k: item[k] for k in ("text", "raw_text", "entities", "markdown")} == {
            k: expected[k] for k in ("text", "raw_text", "entities", "markdown")
        }
        assert item["prompt"] == "<grounding> Question: Where is<phrase> the fire</phrase> next to? Answer:"


def test_predict_draws_the_annotated_image_and_says_where(image_file, tiny_model_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "drawn.png"
    result = invoke("predict", image_file, "--model", tiny_model_dir, "--max-new-tokens", 4, "--draw", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (640, 480)
    assert result.stderr == f"Wrote the drawn image to {out}\n"


def test_predict_names_each_drawn_image_on_stderr_leaving_the_json_alone(image_file, tiny_model_dir, tmp_path):
    out = tmp_path / "drawn.png"
    result = invoke("predict", image_file, image_file, "--model", tiny_model_dir, "--max-new-tokens", 4, "--json",
                    "--draw", out)
    assert result.exit_code == 0, result.output
    assert [item["image"] for item in json.loads(result.stdout)] == [str(image_file)] * 2
    assert result.stderr.splitlines() == [f"Wrote the drawn image to {tmp_path / name}"
                                          for name in ("drawn_1.png", "drawn_2.png")]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "nonsense"], "Unknown task 'nonsense'"),
        (["--task", "phrase_grounding"], "Error: --phrase: Task 'phrase_grounding' needs exactly one phrase; got 0."),
        (["--task", "referring_generation"], "--box: Task 'referring_generation' needs at least one box"),
        (["--task", "grounded_vqa"], "--prompt: Task 'grounded_vqa' needs a question."),
        (["--min-score", "2"], "--min-score: Input should be less than or equal to 1"),
        (["--nms-iou", "-1"], "--nms-iou: Input should be greater than or equal to 0"),
        (["--sample", "--top-p", "0", "--min-score", "2"],
         "--top-p: Input should be greater than 0; --min-score: Input should be less than or equal to 1."),
        (["--task", "referring_generation", "--box", "10,10,5,5"], "inverted"),
        (["--task", "referring_generation", "--box", "0,0,700,100"], "outside the 640x480 image"),
        (["--task", "referring_generation", "--box", "1,2"], "is not a box"),
        (["--max-new-tokens", "0"], "--max-new-tokens: Must be between 1"),
        (["--sample", "--temperature", "inf"], "--temperature: Input should be a finite number"),
        (["--sample", "--seed", str(2**64)], "--seed: Input should be less than or equal to"),
        (["--task", "caption", "--prompt", "<grounding> Hi"], "--task caption does not use --prompt; it takes no options"),
        (["--task", "phrase_grounding", "--phrase", "a dog", "--box", "1,1,5,5"],
         "--task phrase_grounding does not use --box; it takes --phrase."),
        (["--no-grounding"], "--task caption does not use --no-grounding"),
        (["--prompt", "Where?", "--phrase", "a dog"], "--task caption does not use --prompt or --phrase"),
        (["--task", "grounded_vqa", "--prompt", "Why?", "--box", "1,1,5,5"],
         "--task grounded_vqa does not use --box; it takes --prompt."),
    ],
)
def test_bad_requests_exit_1_with_one_clear_line(image_file, tiny_model_dir, extra, message):
    result = invoke("predict", image_file, "--model", tiny_model_dir, *extra)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_prompt_alone_is_sent_as_given(image_file, tiny_model_dir):
    prompt = "<grounding> Describe this image:"
    result = invoke("predict", image_file, "--model", tiny_model_dir, "--prompt", prompt, "--max-new-tokens", 4,
                    "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)[0]
    assert answer["task"] == "raw" and answer["prompt"] == prompt


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty (0 bytes)"),
        (b"this is not an image", "cannot be decoded"),
    ],
)
def test_bad_images_exit_1(tmp_path, tiny_model_dir, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    result = invoke("predict", path, "--model", tiny_model_dir)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_truncated_image_exits_1(tmp_path, tiny_model_dir, image_file):
    path = tmp_path / "cut.png"
    path.write_bytes(image_file.read_bytes()[:2000])
    result = invoke("predict", path, "--model", tiny_model_dir)
    assert result.exit_code == 1 and "truncated" in result.output


def test_missing_model_exits_1_with_download_advice(image_file):
    result = invoke("predict", image_file, "--model", "someone/not-here")
    assert result.exit_code == 1
    assert "hf download someone/not-here" in result.output


def test_help_lists_every_task():
    from kosmos_serve.tasks import Task

    result = invoke("predict", "--help")
    assert result.exit_code == 0
    for task in Task:
        assert task.value in result.output


def test_image_over_the_pixel_cap_exits_1(image_file, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("KOSMOS_MAX_IMAGE_PIXELS", "1000")
    result = invoke("predict", image_file, "--model", tiny_model_dir)
    assert result.exit_code == 1
    assert "640x480 = 307,200 pixels, over the cap of 1,000" in result.output


def test_data_train_and_evaluate_commands_chain(tmp_path, tiny_model_dir):
    scenes = tmp_path / "scenes"
    result = invoke("data", "shapes", "--n", 3, "--seed", 5, "--out", scenes)
    assert result.exit_code == 0, result.output
    records = scenes / "records.jsonl"
    assert result.output.strip() == str(records)
    run = tmp_path / "run"
    result = invoke("train", "--model", tiny_model_dir, "--data", records, "--out", run, "--steps", 2,
                    "--batch-size", 2, "--checkpoint-every", 1, "--patch-supervision-weight", 1.0)
    assert result.exit_code == 0, result.output
    assert f"saved {run / 'final'}" in result.output
    assert "referring expressions, box at IoU>=0.5:" in result.output
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000001", "checkpoint-000002"]
    assert torch.load(run / "checkpoint-000002" / STATE_FILE, weights_only=False)["patch_supervision"] is not None
    result = invoke("evaluate", "--model", run / "final", "--data", records)
    assert result.exit_code == 0 and "objects named with a box" in result.output


def test_tiny_model_prints_the_folder_it_wrote(tmp_path):
    out = tmp_path / "tiny"
    result = invoke("tiny-model", out)
    assert result.exit_code == 0, result.output
    assert result.output == f"{out}\n"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_train_reports_bad_records_by_line(tmp_path, tiny_model_dir):
    records = tmp_path / "bad.jsonl"
    records.write_text('{"image": "missing.png", "caption": "x", "spans": []}\nnot json\n')
    result = invoke("train", "--model", tiny_model_dir, "--data", records, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert "line 1" in result.output and "line 2" in result.output and "Traceback" not in result.output


def test_invalid_setting_from_the_environment_is_one_line(image_file, monkeypatch):
    monkeypatch.setenv("KOSMOS_MAX_BATCH_SIZE", "zero")
    result = invoke("predict", image_file)
    assert result.exit_code == 1
    assert "invalid setting (KOSMOS_MAX_BATCH_SIZE:" in result.output and "Traceback" not in result.output
