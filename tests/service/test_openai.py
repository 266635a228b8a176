"""The OpenAI-compatible API through the real `openai` SDK: completions, streams, models, and typed errors."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path

import httpx
import openai
import pytest

from kosmos_serve.asgi import create_app
from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.engine import Engine, GenerationParams, Request, tokenise
from kosmos_serve.grounding import iou
from kosmos_serve.tasks import Task, TaskInput, build_prompts

NEW_TOKENS = 16
SCENE = Path(__file__).resolve().parents[2] / "examples" / "scene-four-shapes.png"


@pytest.fixture
def model(engine) -> str:
    """The served model's id: the tiny model's folder."""
    return engine.settings.model



def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def user(png: bytes | None, text: str | None = None, images: int = 1) -> dict:
    """A user message: optional text part, then `images` copies of the image part."""
    parts = [{"type": "text", "text": text}] if text is not None else []
    parts += [{"type": "image_url", "image_url": {"url": data_uri(png)}}] * (images if png is not None else 0)
    return {"role": "user", "content": parts}


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)


def run(engine, image, task: TaskInput, **params):
    params.setdefault("max_new_tokens", NEW_TOKENS)
    return engine.run([Request(image, task, GenerationParams(**params))])[0]


def prompt_tokens(engine, image, task: TaskInput) -> int:
    return len(tokenise(engine.processor, build_prompts(task, *image.size)[0].text)[0])


def reassemble(stream) -> dict:
    """A streamed completion as the non-streamed body it stands for, and its chunks' shape checked."""
    chunks = list(stream)
    usage = chunks[-1].usage if chunks and not chunks[-1].choices else None
    choices: dict[int, dict] = {}
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            seen = choices.setdefault(choice.index, {"content": None, "finish_reason": None, "entities": None})
            delta = choice.delta
            if seen["content"] is None:  # the first chunk of a choice: its role and empty content
                assert (delta.role, delta.content) == ("assistant", "")
                seen["content"] = ""
                continue
            assert seen["finish_reason"] is None, "nothing after a choice's finish"
            seen["content"] += delta.content or ""
            if choice.finish_reason is not None:
                seen["finish_reason"] = choice.finish_reason
                seen["entities"] = delta.model_extra["entities"]
    assert len({chunk.id for chunk in chunks}) == 1
    return {"choices": [choices[index] for index in sorted(choices)], "usage": usage, "chunks": len(chunks)}


def as_plain(completion) -> dict:
    return {"choices": [{"content": c.message.content, "finish_reason": c.finish_reason,
                         "entities": c.message.model_extra["entities"]} for c in completion.choices]}


def test_a_completion_is_the_engines_grounded_caption(serve, engine, sample_images, png_bytes):
    image = sample_images[0]
    result = run(engine, image, TaskInput(Task.CAPTION))
    with serve() as url:
        completion = client(url).chat.completions.create(
            model=engine.settings.model, messages=[user(png_bytes[0])], max_tokens=NEW_TOKENS)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == engine.settings.model
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == result.markdown  # the caption keeps its "An image of", as /predict does
    assert choice.message.model_extra["entities"] == [
        {"phrase": e.phrase, "boxes": [list(b) for b in e.boxes], "pixel_boxes": [list(b) for b in e.pixel_boxes],
         "scores": list(e.scores)} for e in result.entities
    ]
    assert choice.finish_reason == ("length" if result.generated_tokens == NEW_TOKENS else "stop")
    assert completion.usage.prompt_tokens == prompt_tokens(engine, image, TaskInput(Task.CAPTION))
    assert completion.usage.prompt_tokens == 1 + 64 + 2 + len(engine.processor.tokenizer(
        "<grounding> An image of", add_special_tokens=False)["input_ids"])  # <s>, image positions, image tags, text
    assert completion.usage.completion_tokens == result.generated_tokens
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + result.generated_tokens


@pytest.mark.parametrize("text", [None, "What is in the middle?", "<grounding><phrase> a red circle</phrase>",
                                  "<grounding> An image of"])
def test_a_stream_reassembles_to_the_completion(model, serve, png_bytes, text):
    with serve() as url:
        api = client(url)
        kwargs = {"model": model, "messages": [user(png_bytes[1], text)], "max_completion_tokens": NEW_TOKENS}
        whole = api.chat.completions.create(**kwargs)
        streamed = reassemble(api.chat.completions.create(**kwargs, stream=True,
                                                          stream_options={"include_usage": True}))
    assert streamed["choices"] == as_plain(whole)["choices"]
    assert streamed["usage"] == whole.usage


def test_the_demo_model_streams_its_caption_phrase_by_phrase(demo_service):
    url = demo_service
    api = client(url)
    whole = api.chat.completions.create(model="demo", messages=[user(SCENE.read_bytes())])
    assert whole.choices[0].message.content.startswith("An image of [a purple triangle](#box=")
    streamed = reassemble(api.chat.completions.create(model="demo", messages=[user(SCENE.read_bytes())], stream=True))
    assert streamed["choices"] == as_plain(whole)["choices"]
    assert streamed["usage"] is None and streamed["chunks"] > 4  # role, several content deltas, finish


def test_the_wire_format_of_a_stream(serve, png_bytes):
    body = {"messages": [user(png_bytes[2])], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with serve() as url:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(event.startswith("data: ") for event in events[:-1])
    chunks = [json.loads(event[len("data: "):]) for event in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks[:-1])  # OpenAI: null until the last
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_prompt_mapping_and_what_earlier_messages_count_for(model, serve, engine, sample_images, png_bytes):
    image, png = sample_images[1], png_bytes[1]
    question = run(engine, image, TaskInput(Task.GROUNDED_VQA, "What is in the middle?"))
    tagged = run(engine, image, TaskInput(Task.RAW, "<grounding><phrase> a red circle</phrase>", grounding=False))
    with serve() as url:
        api = client(url)

        def ask(messages, **kwargs):
            completion = api.chat.completions.create(model=model, messages=messages, max_tokens=NEW_TOKENS, **kwargs)
            return completion.choices[0].message

        plain = ask([user(png, "What is in the middle?")])
        as_string = ask([user(png), {"role": "user", "content": "What is in the middle?"}])
        in_a_conversation = ask([
            {"role": "system", "content": "You are a helpful assistant."},
            user(png, "Describe the picture."),
            {"role": "assistant", "content": "A picture."},
            {"role": "user", "content": [{"type": "text", "text": "What is in"},
                                         {"type": "text", "text": "the middle?"}]},
        ])
        raw = ask([user(png, "<grounding><phrase> a red circle</phrase>")])
    frame = "Question: What is in the middle? Answer:"
    assert question.text.startswith(frame)
    assert plain.content == question.markdown[len(frame):].lstrip()  # the answer, without the question's frame
    assert as_string == plain and in_a_conversation == plain  # system and earlier messages are not sent
    assert raw.content == tagged.markdown  # tags: the prompt as it is, the text as /predict gives it


def test_greedy_sampling_seeds_and_several_choices(model, serve, engine, sample_images, png_bytes):
    image = sample_images[0]
    greedy = run(engine, image, TaskInput(Task.CAPTION))
    sampled = [run(engine, image, TaskInput(Task.CAPTION), do_sample=True, temperature=0.9, top_p=1.0, seed=seed)
               for seed in (11, 12)]
    with serve() as url:
        api = client(url)
        base = {"model": model, "messages": [user(png_bytes[0])], "max_tokens": NEW_TOKENS}
        zero = api.chat.completions.create(**base, temperature=0, top_p=0.5, seed=3)
        two = api.chat.completions.create(**base, temperature=0.9, seed=11, n=2)
        streamed = reassemble(api.chat.completions.create(**base, temperature=0.9, seed=11, n=2, stream=True))
    assert zero.choices[0].message.content == greedy.markdown  # temperature 0: greedy; top_p and seed unused
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.message.content for c in two.choices] == [r.markdown for r in sampled]  # seeds 11 and 12
    assert two.usage.completion_tokens == sum(r.generated_tokens for r in sampled)
    assert streamed["choices"] == as_plain(two)["choices"]


def test_stop_strings_cut_the_answer_before_them(demo_service):
    url = demo_service
    api = client(url)
    messages = [user(SCENE.read_bytes())]
    whole = api.chat.completions.create(model="demo", messages=messages).choices[0].message.content
    assert " and " in whole
    cut = api.chat.completions.create(model="demo", messages=messages, stop=[" and", "zebra"])
    streamed = reassemble(api.chat.completions.create(model="demo", messages=messages, stop=" and", stream=True))
    assert cut.choices[0].message.content == whole[: whole.index(" and")]
    assert cut.choices[0].finish_reason == "stop"
    assert streamed["choices"] == as_plain(cut)["choices"]
    # the prompt's own words ("An image of") are not searched:
    in_the_prompt = api.chat.completions.create(model="demo", messages=messages, stop="image")
    assert in_the_prompt.choices[0].message.content == whole


def test_models_list_and_model_names(serve, engine, png_bytes):
    with serve() as url:
        api = client(url)
        models = api.models.list()
        one = api.models.retrieve(engine.settings.model)
        ignored = api.chat.completions.create(model=engine.settings.model, messages=[user(png_bytes[2])], max_tokens=2,
                                              extra_body={"top_k": 5, "logit_bias": {}})  # unknown fields pass
        by_default = httpx.post(f"{url}/v1/chat/completions", json={"messages": [user(png_bytes[2])], "max_tokens": 2})
        with pytest.raises(openai.NotFoundError) as unknown:
            api.chat.completions.create(model="gpt-4o", messages=[user(png_bytes[2])])
        with pytest.raises(openai.NotFoundError):
            api.models.retrieve("gpt-4o")
    assert [m.id for m in models.data] == [engine.settings.model] and models.data[0].object == "model"
    assert one.id == engine.settings.model and one.owned_by == "kosmos-serve"
    assert ignored.model == engine.settings.model and ignored.choices[0].message.content
    assert by_default.json()["model"] == engine.settings.model  # no model named: the served one
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    assert "gpt-4o" in unknown.value.message and engine.settings.model in unknown.value.message


BAD_REQUESTS = [
    # (what is wrong, request fields, param, words the message must hold)
    ("no image", {"messages": "NO_IMAGE"}, "messages", ["image_url"]),
    ("two images", {"messages": "TWO_IMAGES"}, "messages[0].content[2]", ["one image", "2 image_url parts"]),
    ("images in two messages", {"messages": "IMAGES_IN_TWO"}, "messages[1].content[1]", ["one image"]),
    ("no messages", {"messages": []}, "messages", ["at least 1"]),
    ("an unknown part", {"messages": "AUDIO"}, "messages[0].content[0]", ["input_audio", "image_url"]),
    ("a wrong role", {"messages": "ROLE"}, "messages[0].role", ["user"]),
    ("the assistant last", {"messages": "ASSISTANT_LAST"}, "messages[1].role", ["last message", "user"]),
    ("a remote URL", {"messages": "REMOTE"}, "messages[0].content[0].image_url.url",
     ["KOSMOS_ALLOWED_IMAGE_HOSTS", "data: URI"]),
    ("a file URL", {"messages": "FILE"}, "messages[0].content[0].image_url.url", ["file"]),
    ("not an image", {"messages": "NOT_AN_IMAGE"}, "messages[0].content[0].image_url.url", ["image"]),
    ("greedy n", {"n": 2}, "n", ["temperature"]),
    ("too many tokens", {"max_tokens": 99999}, "max_tokens", ["at most 1024", "KOSMOS_MAX_NEW_TOKENS_CAP"]),
    ("over the cap", {"max_completion_tokens": 2000}, "max_completion_tokens", ["KOSMOS_MAX_NEW_TOKENS_CAP"]),
    ("a tiny temperature", {"temperature": 0.001}, "temperature", ["temperature: must be 0 (greedy)"]),
    ("a negative seed", {"temperature": 1, "seed": -1}, "seed", ["greater than or equal to 0"]),
    ("a seed the second choice overruns", {"temperature": 1, "seed": 2**53 - 1, "n": 2}, "seed",
     ["seed: Input should be less than or equal to"]),
    ("an empty stop", {"stop": [""]}, "stop[0]", ["at least 1"]),
    ("a prompt too long", {"messages": "LONG"}, "messages[0].content", ["2000", "KOSMOS_MAX_PROMPT_CHARS"]),
    ("min_score over 1", {"extra_body": {"min_score": 1.5}}, "min_score", ["min_score", "less than or equal to 1"]),
    ("min_score a word", {"extra_body": {"min_score": "high"}}, "min_score", ["min_score", "valid number"]),
]


def bad_messages(kind: str, png: bytes) -> list[dict]:
    return {
        "NO_IMAGE": [{"role": "user", "content": "What is this?"}],
        "TWO_IMAGES": [user(png, "Compare", images=2)],
        "IMAGES_IN_TWO": [user(png), user(png, "And this?")],
        "AUDIO": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
        "ROLE": [{"role": "robot", "content": "hi"}],
        "ASSISTANT_LAST": [user(png), {"role": "assistant", "content": "An image of"}],
        "REMOTE": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
        "FILE": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
        "NOT_AN_IMAGE": [{"role": "user", "content": [{"type": "image_url",
                                                       "image_url": {"url": "data:image/png;base64,aGk="}}]}],
        "LONG": [user(png, "Why? " * 500)],
    }[kind]


def test_bad_input_raises_the_sdks_typed_errors_with_openais_shape(model, serve, png_bytes):
    with serve(api_key="s3cret") as url:
        api = client(url, api_key="s3cret")
        for what, fields, param, words in BAD_REQUESTS:
            fields = dict(fields)
            if isinstance(fields.get("messages"), str):
                fields["messages"] = bad_messages(fields["messages"], png_bytes[2])
            fields.setdefault("messages", [user(png_bytes[2])])
            fields.setdefault("model", model)
            with pytest.raises(openai.BadRequestError) as raised:
                api.chat.completions.create(**fields)
            error = raised.value
            assert error.status_code == 400, what
            assert error.type == "invalid_request_error" and error.code, what
            assert error.param == param, (what, error.param)
            assert all(word in error.message for word in words), (what, error.message)
            assert set(error.body) == {"message", "type", "param", "code"}
        with pytest.raises(openai.AuthenticationError) as unauthorised:
            client(url, api_key="wrong").chat.completions.create(model=model, messages=[user(png_bytes[2])])
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
    assert unauthorised.value.status_code == 401
    assert unauthorised.value.body == {"message": "A valid API key is needed: send `Authorization: Bearer <key>` or "
                                                  "`X-API-Key: <key>`.",
                                       "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


def test_the_openai_shape_holds_on_its_paths_only(serve):
    key = {"Authorization": "Bearer s3cret"}
    with serve(api_key="s3cret", max_upload_bytes=4096) as url:
        not_json = httpx.post(f"{url}/v1/chat/completions", content=b"{not json",
                              headers={**key, "Content-Type": "application/json"})
        no_messages = httpx.post(f"{url}/v1/chat/completions", json={"model": "x"}, headers=key)
        no_body = httpx.post(f"{url}/v1/chat/completions", headers=key)
        too_large = httpx.post(f"{url}/v1/chat/completions", content=b"x" * 5000, headers=key)
        wrong_method = httpx.get(f"{url}/v1/chat/completions", headers=key)
        no_route = httpx.post(f"{url}/v1/chat/complete", headers=key)
        elsewhere = httpx.post(f"{url}/v1/generate", json={}, headers=key)
        elsewhere_unauthorised = httpx.post(f"{url}/v1/generate", json={})
    for response, status in [(not_json, 400), (no_messages, 400), (no_body, 400), (too_large, 413),
                             (wrong_method, 405), (no_route, 404)]:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
    assert "not valid JSON" in not_json.json()["error"]["message"]
    assert no_messages.json()["error"]["param"] == "messages"
    assert "JSON object with `messages`" in no_body.json()["error"]["message"]
    assert too_large.json()["error"]["code"] == "payload_too_large"
    assert set(elsewhere.json()["error"]) == {"code", "message"}  # other routes keep the service's own shape
    assert elsewhere.status_code == 422 and elsewhere_unauthorised.json()["error"]["code"] == "unauthorized"


def test_an_image_url_on_an_allowed_host_is_fetched(model, serve_app, engine, png_bytes, sample_images):
    """Remote images: only from KOSMOS_ALLOWED_IMAGE_HOSTS (here the service itself serves one)."""
    from fastapi.responses import Response

    settings = ServerSettings(demo=False, allowed_image_hosts=["127.0.0.1"])
    app = create_app(settings, engine.settings, engine=engine)
    app.get("/picture.png")(lambda: Response(png_bytes[2], media_type="image/png"))
    with serve_app(app) as url:
        remote = {"type": "image_url", "image_url": {"url": f"{url}/picture.png"}}
        completion = client(url).chat.completions.create(
            model=model, messages=[{"role": "user", "content": [remote]}], max_tokens=NEW_TOKENS)
    assert completion.choices[0].message.content == run(engine, sample_images[2], TaskInput(Task.CAPTION)).markdown


def test_the_routes_answer_503_until_the_model_is_ready(serve_app, engine, png_bytes):
    app = create_app(ServerSettings(demo=False), engine.settings, engine=engine)
    app.router.lifespan_context = _never_ready  # the batcher never starts: as while the model loads
    with serve_app(app, ready=False) as url:
        models = httpx.get(f"{url}/v1/models")
        chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": [user(png_bytes[2])]})
    for response in (models, chat):
        assert response.status_code == 503 and response.headers["retry-after"]
        assert response.json()["error"]["code"] == "service_busy"
        assert response.json()["error"]["type"] == "server_error"


@contextlib.asynccontextmanager
async def _never_ready(app):
    yield


@pytest.fixture(scope="module")
def demo_service():
    """The service on the shipped demo model, which really grounds the example scenes."""
    from local_server import serve_in_thread

    engine = Engine(EngineSettings(model="demo", device="cpu"))
    app = create_app(ServerSettings(demo=False), engine.settings, engine=engine)
    with serve_in_thread(app) as url:
        yield url


def test_a_tagged_prompt_on_the_demo_scene_finds_the_blue_circle(demo_service):
    url = demo_service
    completion = client(url).chat.completions.create(
        model="demo", messages=[user(SCENE.read_bytes(), "<grounding><phrase> the blue circle</phrase>")])
    message = completion.choices[0].message
    (entity,) = message.model_extra["entities"]
    assert entity["phrase"] == "the blue circle"
    assert message.content == f"[the blue circle](#box={','.join(map(str, entity['pixel_boxes'][0]))})"
    assert iou(entity["pixel_boxes"][0], (134, 0, 221, 87)) >= 0.5  # the circle's true box in the scene
    assert completion.choices[0].finish_reason == "stop"
