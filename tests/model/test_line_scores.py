"""Every line Kosmos-2.5 reads scored from its own probabilities: checked against transformers' logits, batched equal
to alone, on a tiny random Kosmos-2.5 through the production engine.

A random model almost never writes a whole line, so the engine is made to write lines: only the scheduler's choice
of each token is replaced (teacher forcing); its prefill, decode steps, the probabilities it records, parsing and
scoring are the production code's. The forced reading follows a template (`<bbox>`, four coordinates, `</bbox>`,
text, line break) and takes, where the template leaves a choice, the model's likeliest token of that kind.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from PIL import Image, ImageDraw

from kosmos_serve.engine import GenerationParams, Request, line_scoring
from kosmos_serve.engine import scheduler as scheduler_module
from kosmos_serve.engine.line_scoring import NEAR_PIXELS
from kosmos_serve.tasks import PromptSpec, Task, TaskInput

TEXT_TOKENS = 6  # the text of each chosen line
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def template(tokenizer) -> list:
    """Per step of the reading: a token id (forced), or what to choose: `("x"|"y", minimum)` a coordinate (x2 and
    y2 above x1 and y1), `"text"` a letter. Two chosen lines, one without width (dropped), one with no text, `</s>`."""
    ids = tokenizer.convert_tokens_to_ids
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    chosen = [ids("<bbox>"), ("x", None), ("y", None), ("x", -2), ("y", -2), ids("</bbox>"),
              *["text"] * TEXT_TOKENS, *newline]
    dropped = ids(["<bbox>", "<x_40>", "<y_90>", "<x_40>", "<y_99>", "</bbox>"]) + tokenizer(
        "dropped\n", add_special_tokens=False)["input_ids"]
    no_text = ids(["<bbox>", "<x_1>", "<y_1>", "<x_2>", "<y_2>", "</bbox>"]) + newline
    return chosen + chosen + dropped + no_text + [tokenizer.eos_token_id]


@pytest.fixture
def precise_scores(monkeypatch):
    """Line scores rounded to 12 decimals, not 4: a random model's are small, and the checks read them whole."""
    monkeypatch.setattr(line_scoring, "SCORE_DECIMALS", 12)


@pytest.fixture(scope="module")
def pages(sample_images):
    def page(text: str) -> Image.Image:
        image = Image.new("RGB", (500, 160), "white")
        ImageDraw.Draw(image).text((20, 20), text, fill="black")
        return image

    return [page("RECEIPT 0008"), page("Total 50,000"), *sample_images]


@pytest.fixture
def forced_reading(kosmos25_engine, monkeypatch):
    """The engine's scheduler writes the template's reading, choosing as `template` says."""
    tokenizer = kosmos25_engine.processor.tokenizer
    steps = template(tokenizer)
    prompt_length = len(kosmos25_engine.family.tokenise(kosmos25_engine.processor, PromptSpec("<ocr>"))[0])
    vocab = tokenizer.get_vocab()
    letters = torch.tensor([vocab[letter] for letter in LETTERS])
    coordinate = {axis: {vocab[f"<{axis}_{value}>"]: value for value in range(2048)} for axis in "xy"}

    def choose(logits, choosers, ids):
        tokens = []
        for row, so_far in zip(logits, ids):
            step = steps[len(so_far) - prompt_length]
            if isinstance(step, int):
                tokens.append(step)
            elif step == "text":
                tokens.append(int(letters[row[letters].argmax()]))
            else:
                axis, after = step
                least = -1 if after is None else coordinate[axis][so_far[after]]
                allowed = torch.tensor([token for token, value in coordinate[axis].items() if value > least])
                tokens.append(int(allowed[row[allowed].argmax()]))
        return tokens

    monkeypatch.setattr(scheduler_module, "choose_tokens", choose)


def direct_scores(model_dir, image, raw_text: str) -> list[float]:
    """Each kept line's score computed from transformers' own logits for the prompt and the reading, read at once."""
    from transformers import AutoProcessor, Kosmos2_5ForConditionalGeneration

    model = Kosmos2_5ForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(text="<ocr>", images=image, return_tensors="pt")
    reading = processor.tokenizer(raw_text.removeprefix("<ocr>"), add_special_tokens=False)["input_ids"]
    ids = torch.cat([inputs["input_ids"], torch.tensor([reading])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       image_embeds_position_mask=torch.nn.functional.pad(inputs["image_embeds_position_mask"],
                                                                          (0, len(reading))),
                       flattened_patches=inputs["flattened_patches"]).logits
    log_probs = torch.log_softmax(logits[0].float(), dim=-1)
    vocab = processor.tokenizer.get_vocab()
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    starts = [pos for pos, token in enumerate(tokens) if token == "<bbox>"] + [len(tokens)]
    scores = []
    for start, end in itertools.pairwise(starts):
        values = [int(re.findall(r"\d+", token)[0]) for token in tokens[start + 1 : start + 5]]
        if values[0] >= values[2] or values[1] >= values[3]:
            continue
        logs = [float(log_probs[start - 1, ids[0, start]])]
        for pos in range(start + 1, start + 5):
            axis, value = tokens[pos][1], int(re.findall(r"\d+", tokens[pos])[0])
            near = [vocab[f"<{axis}_{v}>"] for v in range(value - NEAR_PIXELS, value + NEAR_PIXELS + 1)
                    if f"<{axis}_{v}>" in vocab]
            logs.append(math.log(float(log_probs[pos - 1, near].exp().sum())))
        score = math.exp(sum(logs) / len(logs))
        text = range(start + 6, end)  # after </bbox>, up to the next box: the text and its line break
        score = math.sqrt(score * math.exp(sum(float(log_probs[p - 1, ids[0, p]]) for p in text) / len(text)))
        scores.append(score)
    return scores


def test_each_lines_score_equals_a_direct_computation_from_transformers_logits(kosmos25_engine, tiny_kosmos25_dir,
                                                                               forced_reading, precise_scores, pages):
    for image in pages[:3]:
        result = kosmos25_engine.predict(image, TaskInput(Task.OCR), GenerationParams(max_new_tokens=64))
        assert len(result.lines) == 3 and result.lines[-1].text == ""  # the line without width dropped
        assert all(len(line.text) == TEXT_TOKENS for line in result.lines[:2])
        expected = direct_scores(tiny_kosmos25_dir, image, result.raw_text)
        assert [line.score for line in result.lines] == pytest.approx(expected, rel=1e-5)
        assert all(0 < line.score < 1 for line in result.lines)
        assert [line["score"] for line in result.to_dict()["lines"]] == [line.score for line in result.lines]


def test_scores_depend_on_the_page(kosmos25_engine, forced_reading, precise_scores, pages):
    """Guards the equality tests: readings of different pages are not scored alike."""
    results = kosmos25_engine.run([Request(image, TaskInput(Task.OCR)) for image in pages])
    assert len({tuple(line.score for line in result.lines) for result in results}) == len(pages)


def test_a_reading_scores_the_same_alone_as_batched_with_others(kosmos25_engine, forced_reading, pages, monkeypatch):
    requests = [Request(image, TaskInput(task)) for image in pages for task in (Task.OCR, Task.MARKDOWN)]
    alone = [kosmos25_engine.run([request])[0] for request in requests]
    batched = kosmos25_engine.run(requests)
    assert [result.lines for result in batched] == [result.lines for result in alone]
    monkeypatch.setattr(line_scoring, "SCORE_DECIMALS", 12)  # and whole, up to float32's last bits
    alone = [kosmos25_engine.run([request])[0] for request in requests]
    batched = kosmos25_engine.run(requests)
    for got, wanted in zip(batched, alone):
        assert [line.text for line in got.lines] == [line.text for line in wanted.lines]
        assert [line.score for line in got.lines] == pytest.approx([line.score for line in wanted.lines], rel=1e-5)
    assert all(result.lines for result in alone[::2]) and not any(result.lines for result in alone[1::2])


def test_beam_search_lines_are_scored_like_greedy_ones(kosmos25_engine, pages):
    """A beam-search reading (transformers' `generate`) is read again to score its lines, as a greedy one is scored."""
    beams = GenerationParams(max_new_tokens=24, num_beams=2)
    result = kosmos25_engine.predict(pages[0], TaskInput(Task.OCR), beams)
    assert all(0.0 <= line.score <= 1.0 for line in result.lines)


def test_min_score_drops_the_lines_under_it_and_their_markdown(kosmos25_engine, forced_reading, precise_scores, pages):
    every = kosmos25_engine.predict(pages[0], TaskInput(Task.OCR), GenerationParams(max_new_tokens=64))
    threshold = sorted(line.score for line in every.lines)[1]  # keeps all but the lowest-scored line
    kept = kosmos25_engine.predict(pages[0], TaskInput(Task.OCR), GenerationParams(max_new_tokens=64,
                                                                                  min_score=threshold))
    assert kept.lines == tuple(line for line in every.lines if line.score >= threshold)
    assert len(kept.lines) == len(every.lines) - 1
    assert kept.text == every.text  # the reading stays whole; only its lines are filtered
    assert kept.markdown.splitlines() == [row for row, line in zip(every.markdown.splitlines(), every.lines)
                                          if line.score >= threshold]
