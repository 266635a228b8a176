"""Kosmos-2.5-chat's `question` through the production engine against transformers' `generate` with the model doc's
chat prompt, on the tiny random Kosmos-2.5 in a folder named as the chat checkpoint."""

import shutil

import pytest
from PIL import Image, ImageDraw

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, Request
from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.tasks import Task, TaskInput

NEW_TOKENS = 16
PARAMS = GenerationParams(max_new_tokens=NEW_TOKENS)
QUESTIONS = ("What is the total?", "Which shop is it?")
DOC_TEMPLATE = ("<md>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions. USER: {} ASSISTANT:")


@pytest.fixture(scope="module")
def chat_dir(tiny_kosmos25_dir, tmp_path_factory):
    """The tiny Kosmos-2.5 in a folder called `kosmos-2.5-chat` (the chat checkpoint differs in its weights only)."""
    folder = tmp_path_factory.mktemp("models") / "kosmos-2.5-chat"
    shutil.copytree(tiny_kosmos25_dir, folder)
    return folder


@pytest.fixture(scope="module")
def chat_engine(chat_dir):
    return Engine(EngineSettings(model=str(chat_dir), device="cpu", max_batch_rows=8))


@pytest.fixture(scope="module")
def pages(sample_images):
    page = Image.new("RGB", (500, 160), "white")
    ImageDraw.Draw(page).text((20, 20), "Total 50,000", fill="black")
    return [page, *sample_images]


def reference_answer(model_dir, image, question):
    """The model doc's chat example: the template's prompt, `generate`, `batch_decode`, the prompt removed."""
    from transformers import AutoProcessor, Kosmos2_5ForConditionalGeneration

    model = Kosmos2_5ForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    prompt = DOC_TEMPLATE.format(question)
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    inputs.pop("height"), inputs.pop("width")
    ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    decoded = processor.batch_decode(ids, skip_special_tokens=True)[0]
    return decoded, decoded.replace(prompt, "")


def test_the_chat_checkpoint_is_known_by_its_name_and_runs_questions(chat_engine, kosmos25_engine):
    assert chat_engine.family.name == "Kosmos-2.5-chat"
    assert chat_engine.family.tasks == (Task.OCR, Task.MARKDOWN, Task.QUESTION)
    assert Task.QUESTION not in kosmos25_engine.family.tasks


def test_a_question_alone_and_batched_equals_generate_with_the_model_docs_chat_prompt(chat_engine, chat_dir, pages):
    requests = [Request(image, TaskInput(Task.QUESTION, prompt=question), PARAMS)
                for image in pages for question in QUESTIONS]
    batched = chat_engine.run(requests)
    for request, result in zip(requests, batched):
        decoded, answer = reference_answer(chat_dir, request.image, request.task.prompt)
        assert result.prompt == DOC_TEMPLATE.format(request.task.prompt)
        assert (result.raw_text, result.text, result.answer) == (decoded, answer, answer)
        assert result.generated_tokens == NEW_TOKENS and not result.lines
        assert chat_engine.run([request])[0].raw_text == result.raw_text
    assert len({result.answer for result in batched}) > 1  # the answers depend on the page and the question


def test_a_question_needs_its_words_and_a_chat_model(chat_engine, kosmos25_engine, pages):
    with pytest.raises(InvalidRequestError, match="needs a question") as missing:
        chat_engine.predict(pages[0], TaskInput(Task.QUESTION), PARAMS)
    assert missing.value.field == "prompt"
    with pytest.raises(InvalidRequestError, match="is a Kosmos-2.5 model, whose tasks are ocr, markdown"):
        kosmos25_engine.predict(pages[0], TaskInput(Task.QUESTION, prompt="What is the total?"), PARAMS)
