"""The OpenAI-compatible chat on Kosmos-2.5 through the real `openai` SDK: an image and no text or "read this" is
`ocr` (the lines in `content`, and with their boxes and scores in `message.lines`), a question on Kosmos-2.5-chat is
`question`, and on Kosmos-2.5 a clear refusal."""

from __future__ import annotations

import base64
import io
import shutil

import openai
import pytest
from forced_reading import force_reading
from local_server import serve_in_thread
from PIL import Image, ImageDraw

from kosmos_serve.asgi import create_app
from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.engine import Engine, GenerationParams, Request
from kosmos_serve.engine.results import line_dict
from kosmos_serve.tasks import Task, TaskInput

NEW_TOKENS = 48


@pytest.fixture(scope="module")
def page() -> Image.Image:
    image = Image.new("RGB", (500, 160), "white")
    ImageDraw.Draw(image).text((20, 20), "RECEIPT 0008", fill="black")
    return image


def message(image: Image.Image, text: str | None = None) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    parts = [{"type": "text", "text": text}] if text is not None else []
    parts.append({"type": "image_url",
                  "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}})
    return {"role": "user", "content": parts}


def served(engine):
    return serve_in_thread(create_app(ServerSettings(demo=False), engine.settings, engine=engine))


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def forced_reading(kosmos25_engine, monkeypatch):
    """The engine writes forced_reading.READING, then `</s>` (a random model writes no lines): only its choice of tokens is replaced."""
    force_reading(kosmos25_engine, monkeypatch)


@pytest.mark.parametrize("text", [None, "Read this, please."])
def test_an_image_with_no_text_or_read_this_is_ocr_with_every_line_scored(kosmos25_engine, forced_reading, page,
                                                                          text):
    result = kosmos25_engine.run([Request(page, TaskInput(Task.OCR), GenerationParams(max_new_tokens=NEW_TOKENS))])[0]
    assert [line.text for line in result.lines] == ["RECEIPT 0008", "Total 50,000"]
    with served(kosmos25_engine) as url:
        api = client(url)
        kwargs = {"model": kosmos25_engine.settings.model, "messages": [message(page, text)],
                  "max_tokens": NEW_TOKENS}
        completion = api.chat.completions.create(**kwargs)
        chunks = list(api.chat.completions.create(**kwargs, stream=True))
    (choice,) = completion.choices
    assert choice.message.content == result.text == "RECEIPT 0008\nTotal 50,000\n"
    assert choice.message.model_extra["lines"] == [line_dict(line) for line in result.lines]
    assert all(0 < line["score"] < 1 for line in choice.message.model_extra["lines"])
    assert choice.message.model_extra["entities"] == [] and choice.finish_reason == "stop"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    last = chunks[-1].choices[0]
    assert streamed == choice.message.content and last.finish_reason == "stop"
    assert last.delta.model_extra["lines"] == choice.message.model_extra["lines"]


@pytest.fixture(scope="module")
def chat_engine(tiny_kosmos25_dir, tmp_path_factory):
    """The tiny Kosmos-2.5 in a folder named as the chat checkpoint: Kosmos-2.5-chat."""
    folder = tmp_path_factory.mktemp("models") / "kosmos-2.5-chat"
    shutil.copytree(tiny_kosmos25_dir, folder)
    return Engine(EngineSettings(model=str(folder), device="cpu", max_batch_rows=8))


def test_a_question_on_the_chat_model_is_its_question_task(chat_engine, page):
    question = "What is the receipt's number?"
    params = GenerationParams(max_new_tokens=12)
    result = chat_engine.run([Request(page, TaskInput(Task.QUESTION, prompt=question), params)])[0]
    with served(chat_engine) as url:
        completion = client(url).chat.completions.create(
            model=chat_engine.settings.model, messages=[message(page, question)], max_tokens=12)
    (choice,) = completion.choices
    assert choice.message.content == result.answer
    assert choice.message.model_extra["entities"] == [] and "lines" not in choice.message.model_extra
    assert completion.usage.completion_tokens == result.generated_tokens == 12


def test_a_question_on_kosmos25_is_refused_naming_its_tasks(kosmos25_engine, page):
    with served(kosmos25_engine) as url, pytest.raises(openai.APIStatusError) as refused:
        client(url).chat.completions.create(model=kosmos25_engine.settings.model,
                                            messages=[message(page, "What is the total?")], max_tokens=8)
    assert refused.value.status_code in (400, 422)
    assert "is a Kosmos-2.5 model, whose tasks are ocr, markdown" in refused.value.message
