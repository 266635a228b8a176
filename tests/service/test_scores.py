"""Box scores and `min_score` through every protocol, on the shipped demo model (its boxes and scores are real).

Each protocol is checked against `/v1/generate` on the same image: the same boxes with the same scores, and
`min_score` dropping exactly the boxes scored under it. /v1/generate, /predict and OpenAI keep every box unless
asked (detection excepted); Label Studio and Supervisely drop boxes under the service's default unless told a
threshold. Bad thresholds answer in each protocol's own error shape, naming the field.
"""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest
from local_server import serve_in_thread
from test_label_studio import LABEL_CONFIG, LABEL_STUDIO_PREDICT, LABELS, SCENE, assert_label_studio_error, data_uri
from test_supervisely import assert_supervisely_error, upload

from kosmos_serve.asgi import create_app
from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.engine import Engine, Result, Timings
from kosmos_serve.grounding import Entity, iou, render_markdown
from kosmos_serve.server.supervisely.protocol import prediction, rectangle_object
from kosmos_serve.tasks import Task

CAPTION_PROMPT = "<grounding> An image of"
PHRASES = list(LABELS.values())



@pytest.fixture(scope="module")
def demo():
    """The service on the demo model, with its own defaults (the model's min_score); yields its base URL."""
    engine = Engine(EngineSettings(model="demo", device="cpu"))
    with serve_in_thread(create_app(ServerSettings(demo=False), engine.settings, engine=engine)) as url:
        yield url


def generate(url: str, **fields) -> dict:
    body = {"image": base64.b64encode(SCENE.read_bytes()).decode(), **fields}
    response = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def kept(entities: list[dict], min_score: float) -> list[dict]:
    """The entities with only their boxes scored `min_score` or more; those left with none dropped."""
    out = []
    for entity in entities:
        keep = [i for i, score in enumerate(entity["scores"]) if score >= min_score]
        if keep:
            out.append({**entity, **{key: [entity[key][i] for i in keep] for key in ("boxes", "pixel_boxes",
                                                                                  "scores")}})
    return out


def markdown(text: str, entities: list[dict]) -> str:
    return render_markdown(text, tuple(Entity(e["phrase"], tuple(e["span"]), tuple(map(tuple, e["boxes"])),
                                              tuple(map(tuple, e["pixel_boxes"])), tuple(e["scores"]))
                                       for e in entities))


def a_threshold_between(entities: list[dict]) -> float:
    """A threshold that keeps some boxes and drops others (the middle of the scores seen)."""
    scores = sorted({score for entity in entities for score in entity["scores"]})
    assert len(scores) >= 2, entities
    return scores[len(scores) // 2]


# ------------------------------------------------------------------------------------------------ /v1 and /predict


def test_generate_scores_every_box_and_min_score_drops_those_under_it(demo):
    whole = generate(demo, task="caption")
    entities = whole["entities"]
    assert entities and all(len(e["scores"]) == len(e["boxes"]) and all(0 <= s <= 1 for s in e["scores"])
                            for e in entities)
    threshold = a_threshold_between(entities)
    cut = generate(demo, task="caption", min_score=threshold)
    upload_cut = httpx.post(f"{demo}/v1/generate/upload", files={"image": ("scene.png", SCENE.read_bytes())},
                            data={"task": "caption", "min_score": str(threshold)}, timeout=60).json()
    events = httpx.post(f"{demo}/v1/generate", timeout=60, json={
        "image": base64.b64encode(SCENE.read_bytes()).decode(), "task": "caption", "min_score": threshold,
        "stream": True}).text
    [streamed] = [json.loads(line.removeprefix("data: ")) for line in events.split("event: result", 1)[1].splitlines()
                  if line.startswith("data: ")][:1]

    assert 0 < len(cut["entities"]) < len(entities)
    assert cut["entities"] == kept(entities, threshold)
    assert cut["text"] == whole["text"] and cut["raw_text"] == whole["raw_text"]  # the words stay
    assert cut["markdown"] == markdown(whole["text"], kept(entities, threshold)) != whole["markdown"]
    assert upload_cut == {**cut, "timings": upload_cut["timings"], "image_cached": upload_cut["image_cached"]}
    assert streamed["entities"] == cut["entities"] and streamed["markdown"] == cut["markdown"]
    assert generate(demo, task="caption", min_score=0)["entities"] == entities  # 0 keeps every box, as unset does


def test_detection_drops_boxes_under_the_default_unless_min_score_is_given(demo):
    default = httpx.get(f"{demo}/info").json()["defaults"]["min_score"]
    assert 0 < default < 1
    by_default = generate(demo, task="detection", phrases=PHRASES)["entities"]
    every = generate(demo, task="detection", phrases=PHRASES, min_score=0)["entities"]
    assert by_default and by_default == kept(every, default)
    strict = a_threshold_between(every)
    assert generate(demo, task="detection", phrases=PHRASES, min_score=strict)["entities"] == kept(every, strict)


def test_detection_gives_a_region_to_one_phrase_unless_nms_iou_is_1(demo):
    default = httpx.get(f"{demo}/info").json()["defaults"]["nms_iou"]
    assert default == 0.5
    every = generate(demo, task="detection", phrases=PHRASES, min_score=0, nms_iou=1)["entities"]
    suppressed = generate(demo, task="detection", phrases=PHRASES, min_score=0)["entities"]
    boxes = [(entity["phrase"], tuple(box)) for entity in suppressed for box in entity["boxes"]]
    assert set(boxes) <= {(entity["phrase"], tuple(box)) for entity in every for box in entity["boxes"]}
    assert all(iou(box, other) <= default for phrase, box in boxes for other_phrase, other in boxes
               if other_phrase != phrase)


def test_predict_gives_the_scores_beside_the_reference_entities(demo):
    def predict(**form) -> dict:
        response = httpx.post(f"{demo}/predict", files={"content": ("scene.png", SCENE.read_bytes())},
                              data={"prompt": CAPTION_PROMPT, **form}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    same = generate(demo, task="raw", prompt=CAPTION_PROMPT, grounding=False)
    answer = predict()
    assert [tuple(e) for e in answer["entities"]] == [(e["phrase"], e["span"], e["boxes"]) for e in same["entities"]]
    assert answer["scores"] == [e["scores"] for e in same["entities"]]  # one list per entity, one score per box
    threshold = a_threshold_between(same["entities"])
    cut = predict(min_score=str(threshold))
    assert cut["scores"] == [e["scores"] for e in kept(same["entities"], threshold)]
    assert [e[0] for e in cut["entities"]] == [e["phrase"] for e in kept(same["entities"], threshold)]
    assert cut["output"] == answer["output"]


BAD_THRESHOLDS = [1.5, -0.1, "high", True, None]  # None: a list instead of a number


@pytest.mark.parametrize("value", BAD_THRESHOLDS)
def test_a_bad_min_score_is_a_422_naming_it_in_the_services_shape(demo, value):
    value = [0.5] if value is None else value
    response = httpx.post(f"{demo}/v1/generate", json={"image": data_uri(SCENE), "min_score": value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request" and "min_score" in response.json()["error"]["message"]
    form = "[0.5]" if isinstance(value, list) else str(value)  # a form's text: "True" is no number either
    for route, field in (("/v1/generate/upload", "image"), ("/predict", "content")):
        response = httpx.post(f"{demo}{route}", files={field: ("a.png", SCENE.read_bytes())}, data={"min_score": form})
        assert response.status_code == 422, (route, response.text)
        assert response.json()["error"]["code"] == "invalid_request", route
        assert "min_score" in response.json()["error"]["message"], route


@pytest.mark.parametrize("value", [1.5, -0.1, "high", True])
def test_a_bad_nms_iou_is_a_422_naming_it(demo, value):
    response = httpx.post(f"{demo}/v1/generate", json={"image": data_uri(SCENE), "nms_iou": value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request" and "nms_iou" in response.json()["error"]["message"]


def test_openapi_declares_scores_and_min_score(demo):
    spec = httpx.get(f"{demo}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    entity_schemas = [name for name in schemas if name.endswith("EntityOut")]
    assert len(entity_schemas) == 2  # /v1/generate's and OpenAI's
    for name in entity_schemas:
        assert "confidence that this box shows the phrase" in schemas[name]["properties"]["scores"]["description"]
        assert "scores" in schemas[name]["required"]
    for name in ("GenerateJSON", "GenerateForm", "ChatCompletionRequest", "Body_predict_predict_post"):
        field = schemas[name]["properties"]["min_score"]
        assert "boxes scored under this" in field["description"].lower(), name
        number = field["anyOf"][0]
        assert (number["type"], number["minimum"], number["maximum"]) == ("number", 0, 1), name
    assert "scores" in schemas["PredictResponse"]["properties"]
    assert schemas["GenerateResponse"]["examples"][0]["entities"][0]["scores"]


# ------------------------------------------------------------------------------------------------ OpenAI


def test_openai_entities_carry_scores_and_min_score_comes_as_an_extra(demo):
    api = openai.OpenAI(base_url=f"{demo}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(SCENE)}}]}]
    caption = generate(demo, task="caption")
    threshold = a_threshold_between(caption["entities"])
    cut = generate(demo, task="caption", min_score=threshold)

    whole = api.chat.completions.create(model="demo", messages=messages).choices[0].message
    some = api.chat.completions.create(model="demo", messages=messages, extra_body={"min_score": threshold})
    chunks = list(api.chat.completions.create(model="demo", messages=messages, stream=True,
                                              extra_body={"min_score": threshold}))

    def as_chat(entities: list[dict]) -> list[dict]:
        return [{key: e[key] for key in ("phrase", "boxes", "pixel_boxes", "scores")} for e in entities]

    assert whole.model_extra["entities"] == as_chat(caption["entities"]) and whole.content == caption["markdown"]
    message = some.choices[0].message
    assert message.model_extra["entities"] == as_chat(cut["entities"]) and message.content == cut["markdown"]
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == message.content  # the stream never showed a link that the threshold then dropped
    assert chunks[-1].choices[0].delta.model_extra["entities"] == message.model_extra["entities"]
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(model="demo", messages=messages, extra_body={"min_score": True})
    assert raised.value.param == "min_score" and "min_score" in raised.value.message


# ------------------------------------------------------------------------------------------------ Label Studio


def label_studio_predict(url: str, config: str = LABEL_CONFIG, context: dict | None = None) -> httpx.Response:
    body = json.loads(json.dumps(LABEL_STUDIO_PREDICT))
    body["tasks"][0]["data"]["image"] = data_uri(SCENE)
    body["label_config"] = config
    body["params"]["context"] = context
    return httpx.post(f"{url}/label-studio/predict", json=body, timeout=120)


def regions_of(entities: list[dict]) -> list:
    """What Label Studio's regions must be: each box's label and score."""
    labels = {phrase: label for label, phrase in LABELS.items()}
    return [(labels[e["phrase"]], score) for e in entities for score in e["scores"]]


def with_number(default: str | None) -> str:
    attribute = "" if default is None else f' defaultValue="{default}"'
    return LABEL_CONFIG.replace("</View>", f'<Number name="min_score" toName="image" min="0" max="1" step="0.05"'
                                           f'{attribute}/></View>')


def test_label_studio_takes_the_threshold_from_a_number_control(demo):
    every = generate(demo, task="detection", phrases=PHRASES, min_score=0)["entities"]
    threshold = a_threshold_between(every)
    from_config = label_studio_predict(demo, with_number(str(threshold))).json()["results"][0]
    typed = {"result": [{"from_name": "min_score", "to_name": "image", "type": "number", "value": {"number": 0}}]}
    from_annotator = label_studio_predict(demo, with_number(str(threshold)), typed).json()["results"][0]
    unset = label_studio_predict(demo, with_number(None)).json()["results"][0]
    default = httpx.get(f"{demo}/info").json()["defaults"]["min_score"]

    def got(prediction: dict) -> list:
        return [(r["value"]["rectanglelabels"][0], r["score"]) for r in prediction["result"]]

    assert got(from_config) == regions_of(kept(every, threshold))
    assert from_config["score"] == round(sum(s for _, s in got(from_config)) / len(from_config["result"]), 4)
    assert got(from_annotator) == regions_of(every)  # the annotator's 0 keeps every box
    assert got(unset) == regions_of(kept(every, default))  # no defaultValue: the service's default


@pytest.mark.parametrize(("config", "context", "fragment"), [
    (with_number("high"), None, "defaultValue is 'high'"),
    (with_number("1.5"), None, "defaultValue is '1.5'"),
    (with_number(None), {"result": [{"from_name": "min_score", "value": {"number": 2}}]}, "value is 2"),
    (with_number(None), {"result": [{"from_name": "min_score", "value": {"number": True}}]}, "value is True"),
    (with_number(None), {"result": [{"from_name": "min_score", "value": {}}]}, "value is None"),
])
def test_a_bad_label_studio_threshold_is_a_422_naming_it(demo, config, context, fragment):
    assert_label_studio_error(label_studio_predict(demo, config, context), 422, "min_score", fragment)
    if context is None:  # a bad defaultValue is refused when Label Studio connects the project, too
        setup = httpx.post(f"{demo}/label-studio/setup", json={"project": "5.1", "schema": config})
        assert_label_studio_error(setup, 422, "min_score", fragment)


# ------------------------------------------------------------------------------------------------ Supervisely


def supervisely_objects(url: str, **settings) -> list:
    response = httpx.post(f"{url}/supervisely/inference_image", timeout=60, **upload(
        ("scene.png", SCENE.read_bytes()), settings={"settings": {"max_new_tokens": 32, **settings}}))
    assert response.status_code == 200, response.text
    return [(o["classTitle"], o["points"]["exterior"], [t["value"] for t in o["tags"] if t["name"] == "confidence"])
            for o in response.json()["annotation"]["objects"]]


def test_supervisely_takes_min_score_from_its_settings(demo):
    every = generate(demo, task="raw", prompt=CAPTION_PROMPT, grounding=False, max_new_tokens=32)["entities"]
    threshold = a_threshold_between(every)
    default = httpx.get(f"{demo}/info").json()["defaults"]["min_score"]

    def objects(entities: list[dict]) -> list:
        return [(e["phrase"], [[x1, y1], [x2, y2]], [score]) for e in entities
                for (x1, y1, x2, y2), score in zip(e["pixel_boxes"], e["scores"], strict=True)]

    assert supervisely_objects(demo, min_score=0) == objects(every)
    assert supervisely_objects(demo, min_score=threshold) == objects(kept(every, threshold))
    assert supervisely_objects(demo) == objects(kept(every, default))


@pytest.mark.parametrize("value", BAD_THRESHOLDS)
def test_a_bad_supervisely_min_score_is_refused_in_its_shape(demo, value):
    value = [0.5] if value is None else value
    response = httpx.post(f"{demo}/supervisely/inference_image", timeout=60, **upload(
        ("scene.png", SCENE.read_bytes()), settings={"settings": {"min_score": value}}))
    assert_supervisely_error(response, 400, "settings.min_score")


def test_rectangle_object_is_the_sdks_label_json():
    """Label.to_json of a sly.Rectangle(top=9, left=132, bottom=88, right=225) labelled by a model (SDK 6.74.51),
    with a Tag(TagMeta("confidence", TagValueType.ANY_NUMBER), 0.75), as the SDK's ObjectDetection labels a box."""
    assert rectangle_object("the blue circle", (132, 9, 225, 88), 0.75) == {
        "classTitle": "the blue circle", "description": "", "tags": [{"name": "confidence", "value": 0.75}],
        "points": {"exterior": [[132, 9], [225, 88]], "interior": []},
        "geometryType": "rectangle", "shape": "rectangle", "nnCreated": True, "nnUpdated": True,
    }


def test_prediction_skips_only_blank_phrases_and_orders_each_boxs_corners():
    entities = (Entity("a red star", (0, 10), ((0.1, 0.1, 0.2, 0.2),), ((10, 20, 30, 40), (50, 60, 40, 50)),
                       (0.9, 0.4)),
                Entity(" ", (11, 12), ((0.1, 0.1, 0.2, 0.2),), ((1, 2, 3, 4),), (0.8,)))
    result = Result(Task.RAW, CAPTION_PROMPT, "a red star", "a red star", "", entities, "", (100, 200), 3, False,
                    Timings())
    objects = prediction(result)["annotation"]["objects"]
    assert [o["points"]["exterior"] for o in objects] == [[[10, 20], [30, 40]], [[40, 50], [50, 60]]]
    assert [o["tags"] for o in objects] == [[{"name": "confidence", "value": score}] for score in (0.9, 0.4)]
    assert prediction(result)["annotation"]["size"] == {"height": 200, "width": 100}


# ------------------------------------------------------------------------------------------------ operator's default


def test_the_operators_default_is_what_label_studio_and_supervisely_drop_under():
    """KOSMOS_MIN_SCORE (here 0.6) over the model's own default, in /info and in both annotation protocols."""
    engine = Engine(EngineSettings(model="demo", device="cpu", min_score=0.6))
    with serve_in_thread(create_app(ServerSettings(demo=False), engine.settings, engine=engine)) as url:
        every = generate(url, task="detection", phrases=PHRASES, min_score=0)["entities"]
        caption = generate(url, task="raw", prompt=CAPTION_PROMPT, grounding=False, max_new_tokens=32)["entities"]
        info = httpx.get(f"{url}/info").json()
        regions = label_studio_predict(url).json()["results"][0]["result"]
        objects = supervisely_objects(url)
        settings = httpx.post(f"{url}/supervisely/get_custom_inference_settings", json={}).json()["settings"]
    assert info["defaults"]["min_score"] == 0.6 and "min_score: 0.6" in settings.splitlines()
    assert [(r["value"]["rectanglelabels"][0], r["score"]) for r in regions] == regions_of(kept(every, 0.6))
    assert [(phrase, score) for phrase, _, [score] in objects] == [
        (e["phrase"], score) for e in kept(caption, 0.6) for score in e["scores"]]
    assert len(kept(every, 0.6)) < len(every) or len(kept(caption, 0.6)) < len(caption)  # 0.6 dropped something
