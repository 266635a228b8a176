"""The reading demo attempt's parts (`training/demo_reader.py`): its start, its training, and a Kosmos-2.5 whose
processor cuts pages into fewer patches than the checkpoints' 4096, served faithfully (the engine passes the model's
own `max_patches`, and boxes scale by the size that gives)."""

import random
import re

import pytest
import torch

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, Request
from kosmos_serve.ocr import read_lines, resized_size
from kosmos_serve.tasks import PromptSpec, Task, TaskInput
from kosmos_serve.training.demo_reader import (
    READER_MAX_PATCHES,
    READER_STYLE,
    ReaderRecipe,
    build_reader_model,
    patch_words,
    reading_target,
    train_reader,
)
from kosmos_serve.training.pages import draw_page

NEW_TOKENS = 16
BOX = r"<bbox><x_\d+><y_\d+><x_\d+><y_\d+></bbox>"


@pytest.fixture(scope="module")
def untrained_reader(tmp_path_factory):
    """The reader as training starts it, saved like any checkpoint; and its model and processor."""
    model, processor = build_reader_model(seed=0)
    folder = tmp_path_factory.mktemp("reader")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model.eval(), processor


@pytest.fixture(scope="module")
def pages():
    """A training-style page, and a wide page of another aspect ratio (so of another grid of patches)."""
    page = draw_page(random.Random("test"), READER_STYLE).image
    wide = draw_page(random.Random("wide"), READER_STYLE).image.resize((400, 150))
    return [page, wide]


def test_each_image_token_starts_as_a_copy_of_its_patch(untrained_reader, pages):
    _, model, processor = untrained_reader
    inputs = processor(text="<ocr>", images=pages[0], max_patches=READER_MAX_PATCHES)
    with torch.no_grad():
        patches = model.vision_model(inputs["flattened_patches"]).last_hidden_state
        tokens, _ = model.image_to_text_projection(patches)
        projected = model.image_to_text_projection.dense(patches)
    codes = 8  # dims 0-7: each patch's row and column code
    same_code = (tokens[0, :, :codes].sign() == projected[0, :, :codes].sign()).all(dim=-1)
    assert same_code.float().mean() >= 0.95  # token i carries patch i's position
    assert torch.cosine_similarity(tokens[0], projected[0], dim=-1).mean() >= 0.9  # and its content


def test_patch_words_mark_the_patches_under_each_word():
    page = draw_page(random.Random("words"), READER_STYLE)
    words = patch_words(page).view(16, 16)
    for line in page.lines:
        x1, y1, x2, y2 = line.box
        row = (y1 + y2) // 2 // 16
        marked = words[row, x1 // 16 + 1:(x2 - 1) // 16].tolist()  # the patches well inside the line
        assert marked and all(marked), (line, marked)
    assert (words > 0).sum() < words.numel() / 2  # the background is 0


def test_a_reader_with_fewer_patches_reads_as_transformers_does_with_them(untrained_reader, pages):
    """The engine cuts each page as the model's image processor says (256 patches), and its boxes scale by the size
    that gives: raw text equal to `generate` on the processor's inputs for that many patches, lines as the model doc
    post-processes them."""
    folder, model, processor = untrained_reader
    engine = Engine(EngineSettings(model=str(folder), device="cpu", max_batch_rows=4))
    params = GenerationParams(max_new_tokens=NEW_TOKENS)
    results = engine.run([Request(page, TaskInput(Task.OCR), params) for page in pages])
    for page, result in zip(pages, results):
        inputs = processor(text="<ocr>", images=page, max_patches=processor.image_processor.max_patches)
        height, width = int(inputs.pop("height")), int(inputs.pop("width"))
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert result.raw_text == processor.batch_decode(ids, skip_special_tokens=True)[0]
        assert (width, height) == resized_size(*page.size, READER_MAX_PATCHES) != resized_size(*page.size)
        reading = f"<ocr><bbox><x_3><y_5><x_{width - 2}><y_{height // 2}></bbox>one line\n"
        [line] = engine.parse(reading, PromptSpec("<ocr>"), page.size).lines
        assert line.box == (int(3 * (page.width / width)), int(5 * (page.height / height)),
                            int((width - 2) * (page.width / width)), int(height // 2 * (page.height / height)))


def test_the_reading_target_is_what_the_parser_reads_back(untrained_reader):
    _, _, processor = untrained_reader
    for index in range(5):
        page = draw_page(random.Random(f"target:{index}"), READER_STYLE)
        target = reading_target(page)
        assert len(re.findall(BOX, target)) == len(page.lines)
        assert target.count("\n") == len(page.lines)
        read = read_lines(target, *page.image.size, READER_MAX_PATCHES)
        assert [line.text for line in read] == [line.text for line in page.lines]
        for line, truth in zip(read, page.lines):
            assert all(abs(a - b) <= 2 for a, b in zip(line.box, truth.box)), (line.box, truth.box)
        ids = processor.tokenizer(target)["input_ids"]
        words = sum(len(line.text.split(" ")) for line in page.lines)
        assert len(ids) == len(page.lines) * 7 + words  # a box: 6 tokens, a line break 1, a word 1


def test_training_steps_and_continuing_write_a_servable_reader(tmp_path):
    recipe = ReaderRecipe(steps=2, batch_size=2, warmup_steps=1)
    logged = []
    final = train_reader(tmp_path, recipe, log=logged.append)
    assert (tmp_path / "checkpoint" / "state.pt").exists()
    again = train_reader(tmp_path, ReaderRecipe(steps=3, batch_size=2, warmup_steps=1), log=logged.append)
    assert again == final and logged[0] == "continuing from step 2"
    engine = Engine(EngineSettings(model=str(final), device="cpu"))
    assert engine.family.name == "Kosmos-2.5" and engine.defaults.max_new_tokens == 128
    page = draw_page(random.Random("served"), READER_STYLE).image
    result = engine.run([Request(page, TaskInput(Task.OCR), GenerationParams(max_new_tokens=4))])[0]
    assert result.prompt == "<ocr>" and result.generated_tokens == 4


def test_the_command_trains_and_scores_on_held_out_pages(tmp_path, monkeypatch):
    from cli_invocation import invoke

    from kosmos_serve.training import demo_reader

    monkeypatch.setattr(demo_reader, "RECIPE", ReaderRecipe(steps=2, batch_size=2, warmup_steps=1))
    monkeypatch.setattr(demo_reader, "HELD_OUT_PAGES", 3)
    result = invoke("train-demo-2.5", "--out", tmp_path, "--threads", 1)
    assert result.exit_code == 0, result.output
    scores = (tmp_path / "final" / demo_reader.SCORES_FILE).read_text()
    assert scores.startswith("Held-out pages: 3, seed 2 (training drew its pages from seed 1); trained 2 steps of 2 ")
    assert "line F1 %" in scores and result.output.endswith(f"saved {tmp_path / 'final'}\n")
    assert len((tmp_path / "held-out" / "pages.jsonl").read_text().splitlines()) == 3
