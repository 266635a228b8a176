"""Kosmos-2.5 through the production engine against transformers' model doc (generate + its post-processing), on a
tiny random model: alone, batched with pages of other patch counts, and from the image-feature cache."""

import dataclasses
import json
import re

import pytest
import torch
from cli_invocation import invoke
from PIL import Image

from kosmos_serve.engine import GenerationParams, ImageFeatureCache, Request
from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.ocr import resized_size
from kosmos_serve.tasks import PromptSpec, Task, TaskInput

NEW_TOKENS = 24
PARAMS = GenerationParams(max_new_tokens=NEW_TOKENS)
TASKS = [TaskInput(Task.OCR), TaskInput(Task.MARKDOWN)]
PROMPTS = {Task.OCR: "<ocr>", Task.MARKDOWN: "<md>"}
BOX = r"<bbox><x_\d+><y_\d+><x_\d+><y_\d+></bbox>"  # the model doc's pattern


def doc_post_process(decoded: str, prompt: str, scale_height, scale_width):
    """The model doc's post-processing: the prompt removed; for `<ocr>`, each box (of the doc's pattern) and the text
    up to the next box, scaled by the doc's factors (tensors: raw size / the processor's size) and truncated, boxes
    with x0 >= x1 or y0 >= y1 left out."""
    text = decoded.replace(prompt, "")
    if "<md>" in prompt:
        return text
    boxes = [[int(number) for number in re.findall(r"\d+", box)] for box in re.findall(BOX, text)]
    lines = []
    for (x0, y0, x1, y1), line in zip(boxes, re.split(BOX, text)[1:]):
        if not (x0 >= x1 or y0 >= y1):
            lines.append((int(x0 * scale_width), int(y0 * scale_height), int(x1 * scale_width),
                          int(y1 * scale_height), line))
    return lines


@pytest.fixture(scope="module")
def reference(tiny_kosmos25_dir):
    """transformers' model doc, one image at a time: the processor, `generate`, `batch_decode`, its post-processing."""
    from transformers import AutoProcessor, Kosmos2_5ForConditionalGeneration

    model = Kosmos2_5ForConditionalGeneration.from_pretrained(tiny_kosmos25_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_kosmos25_dir)

    def run(image, prompt, decoded=None, **generate_kwargs):
        inputs = processor(text=prompt, images=image, return_tensors="pt")
        height, width = inputs.pop("height"), inputs.pop("width")
        if decoded is None:
            ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, **generate_kwargs)
            decoded = processor.batch_decode(ids, skip_special_tokens=True)[0]
        return decoded, doc_post_process(decoded, prompt, image.height / height, image.width / width)

    run.processor = processor
    return run


def as_doc_lines(result):
    """A result's lines as the doc's post-processing lists them: the box, then the text with the line break that ends
    it (every line of a complete reading has one)."""
    return [(*line.box, line.text + "\n") for line in result.lines]


def comparable(result):
    """Everything that must not depend on batching or caching."""
    return (result.raw_text, result.text, result.answer, result.markdown, result.lines, result.generated_tokens)


def test_the_family_and_its_defaults_come_from_the_config(kosmos25_engine):
    assert kosmos25_engine.family.name == "Kosmos-2.5"
    assert kosmos25_engine.family.tasks == (Task.OCR, Task.MARKDOWN)
    assert (kosmos25_engine.defaults.max_new_tokens, kosmos25_engine.defaults.no_repeat_ngram_size) == (1024, 0)


def test_every_task_alone_equals_the_model_docs_reference(kosmos25_engine, reference, kosmos25_pages):
    for image in kosmos25_pages:
        for task in TASKS:
            result = kosmos25_engine.run([Request(image, task, PARAMS)])[0]
            prompt = PROMPTS[task.task]
            decoded, post_processed = reference(image, prompt)
            assert result.raw_text == decoded
            assert result.prompt == prompt and result.generated_tokens == NEW_TOKENS
            if task.task is Task.MARKDOWN:
                assert result.text == result.markdown == post_processed
                assert "lines" not in result.to_dict()
            else:
                assert result.text == re.sub(BOX, "", decoded.replace(prompt, ""))
                assert as_doc_lines(result) == post_processed
                assert result.to_dict()["lines"] == [{"text": line.text, "corners": [list(c) for c in line.corners],
                                                      "box": list(line.box), "score": line.score}
                                                     for line in result.lines]


def test_lines_and_boxes_equal_the_model_docs_with_the_processors_own_sizes(kosmos25_engine, reference, kosmos25_pages):
    """A random model writes no lines: the engine's parsing of written ones, against the doc's on each page's sizes."""
    for image in kosmos25_pages:
        width, height = resized_size(*image.size)
        reading = (f"<ocr><bbox><x_0><y_0><x_{width}><y_{height}></bbox>the whole page\n"
                   f"<bbox><x_13><y_26><x_{width // 3}><y_{height // 2 + 1}></bbox>a line, with a comma\n"
                   f"<bbox><x_40><y_52><x_40><y_60></bbox>no width\n"
                   f"<bbox><x_{width // 7}><y_{height // 5}><x_{width - 1}><y_{height - 3}></bbox>the last line\n")
        _, post_processed = reference(image, "<ocr>", decoded=reading)
        parsed = kosmos25_engine.parse(reading, PromptSpec("<ocr>"), image.size)
        assert len(post_processed) == 3
        assert as_doc_lines(parsed) == post_processed


def test_the_processor_resizes_each_page_as_the_parser_expects(reference, kosmos25_pages):
    for size in [image.size for image in kosmos25_pages] + [(1, 1), (4000, 10), (10, 4000), (1024, 1024), (999, 1001)]:
        encoded = reference.processor.image_processor(Image.new("RGB", size), max_patches=4096)
        assert resized_size(*size) == (int(encoded["width"][0]), int(encoded["height"][0])), size


def test_batched_equals_alone_equals_cached(kosmos25_engine, kosmos25_pages):
    requests = [Request(image, task, PARAMS) for task in TASKS for image in kosmos25_pages]
    kosmos25_engine.cache = ImageFeatureCache(0)
    alone = [comparable(kosmos25_engine.run([request])[0]) for request in requests]
    kosmos25_engine.cache = ImageFeatureCache(16)
    batched = kosmos25_engine.run(requests)
    assert [comparable(result) for result in batched] == alone
    assert not any(result.image_cached for result in batched)
    cached = kosmos25_engine.run(requests)
    assert [comparable(result) for result in cached] == alone
    assert all(result.image_cached and result.timings.vision == 0 for result in cached)


def test_outputs_depend_on_image_and_prompt(kosmos25_engine, kosmos25_pages):
    """Guards the equality tests above: on a model whose output ignored its inputs they would prove nothing."""
    results = kosmos25_engine.run([Request(image, task, PARAMS) for task in TASKS for image in kosmos25_pages])
    readings = [result.raw_text.removeprefix(result.prompt) for result in results]
    assert len(set(readings[: len(kosmos25_pages)])) >= 3 and readings[: len(kosmos25_pages)] != readings[len(kosmos25_pages) :]


def test_beam_search_equals_the_reference(kosmos25_engine, reference, kosmos25_pages):
    beams = dataclasses.replace(PARAMS, num_beams=2)
    result = kosmos25_engine.run([Request(kosmos25_pages[0], TaskInput(Task.OCR), beams)])[0]
    assert result.raw_text == reference(kosmos25_pages[0], "<ocr>", num_beams=2)[0]


def test_each_family_refuses_the_others_tasks(kosmos25_engine, engine, kosmos25_pages):
    with pytest.raises(InvalidRequestError, match="is a Kosmos-2.5 model, whose tasks are ocr, markdown") as refused:
        kosmos25_engine.predict(kosmos25_pages[0], TaskInput(Task.CAPTION), PARAMS)
    assert refused.value.field == "task"
    with pytest.raises(InvalidRequestError, match="is a Kosmos-2 model, whose tasks are caption, detailed_caption"):
        engine.predict(kosmos25_pages[0], TaskInput(Task.OCR), PARAMS)


def test_the_tiny_model_command_writes_the_same_kosmos25_every_time(tiny_kosmos25_dir, tmp_path):
    result = invoke("tiny-model", "--family", "kosmos-2.5", tmp_path / "again")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "again")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_kosmos25_dir / name).read_bytes()


def test_predict_ocr_prints_the_reading_and_its_json_equals_the_engine(kosmos25_engine, tiny_kosmos25_dir, kosmos25_pages,
                                                                       tmp_path):
    path = tmp_path / "page.png"
    kosmos25_pages[-1].save(path)
    expected = kosmos25_engine.predict(kosmos25_pages[-1], TaskInput(Task.OCR), PARAMS).to_dict()
    as_json = invoke("predict", path, "--model", tiny_kosmos25_dir, "--task", "ocr", "--json",
                     "--max-new-tokens", NEW_TOKENS)
    assert as_json.exit_code == 0, as_json.output
    (item,) = json.loads(as_json.output)
    assert item["image"] == str(path) and item["prompt"] == "<ocr>"
    assert {key: item[key] for key in expected if key not in ("timings", "image_cached")} == {
        key: value for key, value in expected.items() if key not in ("timings", "image_cached")}
    printed = invoke("predict", path, "--model", tiny_kosmos25_dir, "--task", "ocr", "--max-new-tokens", NEW_TOKENS)
    assert printed.exit_code == 0, printed.output
    assert printed.output.splitlines()[0] == f"{path} (500x160)"
    without_a_task = invoke("predict", path, "--model", tiny_kosmos25_dir, "--json", "--max-new-tokens", NEW_TOKENS)
    assert without_a_task.exit_code == 0, without_a_task.output
    assert json.loads(without_a_task.output)[0]["raw_text"] == item["raw_text"]  # ocr: the model's first task


def test_predict_refuses_a_kosmos_2_task_on_a_kosmos25(tiny_kosmos25_dir, kosmos25_pages, tmp_path):
    path = tmp_path / "page.png"
    kosmos25_pages[-1].save(path)
    result = invoke("predict", path, "--model", tiny_kosmos25_dir, "--task", "caption")
    assert result.exit_code == 1
    assert "is a Kosmos-2.5 model, whose tasks are ocr, markdown" in result.output


def _attention_calls(engine, image) -> tuple[int, torch.Tensor]:
    """How many SDPA calls encoding `image` makes, and the features it gives."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        features = engine.encode_images([image])
    return sum(event.count for event in profile.key_averages() if event.key == "aten::scaled_dot_product_attention"), features


def test_the_vision_attention_runs_as_attn_implementation_says(kosmos25_engine, tiny_kosmos25_dir, kosmos25_pages):
    """transformers' vision attention always falls back to eager (a `getattr` on its attention registry); the engine
    runs it through SDPA, as asked, with the same features to float32 rounding, and eager bit for bit when asked."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine

    eager = Engine(EngineSettings(model=str(tiny_kosmos25_dir), device="cpu", attention="eager"))
    layers = kosmos25_engine.model.config.vision_config.num_hidden_layers
    sdpa_calls, sdpa_features = _attention_calls(kosmos25_engine, kosmos25_pages[-1])
    eager_calls, eager_features = _attention_calls(eager, kosmos25_pages[-1])
    assert eager_calls == 0 and sdpa_calls == layers + 1  # every vision layer's, and the projection's own
    torch.testing.assert_close(sdpa_features, eager_features, rtol=1e-4, atol=1e-5)

    from transformers import Kosmos2_5ForConditionalGeneration

    from kosmos_serve.engine.features import flattened_patch_features

    reference = Kosmos2_5ForConditionalGeneration.from_pretrained(tiny_kosmos25_dir, attn_implementation="eager").eval()
    patches = eager.processor(text="", images=kosmos25_pages[-1])["flattened_patches"]
    with torch.inference_mode():
        assert torch.equal(flattened_patch_features(reference, patches), eager_features)
