"""Every box scored from the model's own probabilities: checked against transformers' logits, batched equal to solo.

A random tiny model almost never writes a box, so the checks that need boxes run on the shipped
demo model (a small Kosmos-2 trained to ground shapes), through the production engine.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, Request
from kosmos_serve.engine.loading import DEMO_MODEL_DIR
from kosmos_serve.engine.scoring import GroundingVocabulary, PhrasePriors, TokenEvidence, score_output
from kosmos_serve.grounding import iou, parse_generation, suppress_overlaps
from kosmos_serve.tasks import TaskInput

SCENE_PHRASES = ("a purple triangle", "a yellow cross", "a blue circle", "a red square", "a green star")


@pytest.fixture(scope="module")
def demo_engine():
    return Engine(EngineSettings(model="demo", device="cpu", max_batch_rows=16))


@pytest.fixture(scope="module")
def scene():
    from kosmos_serve.demo import EXAMPLES_DIR

    return Image.open(EXAMPLES_DIR / "scene-four-shapes.png").convert("RGB")


def _scores(result):
    return [(entity.phrase, entity.boxes, entity.scores) for entity in result.entities]


def assert_same_up_to_the_last_digit(got, expected):
    """The same phrases and boxes; each score the same but for a flip of its 4th decimal (float32 rounding of
    attention over padded rows, about 1 score in 800 on the demo's held-out scenes)."""
    assert [(phrase, boxes) for phrase, boxes, _ in got] == [(phrase, boxes) for phrase, boxes, _ in expected]
    for (_, _, scores), (_, _, wanted) in zip(got, expected):
        assert scores == pytest.approx(wanted, abs=1.01e-4)


def test_every_box_has_one_score_in_0_1_for_every_task(demo_engine, scene):
    everything = GenerationParams(min_score=0.0)
    results = demo_engine.run([
        Request(scene, TaskInput("detection", phrases=SCENE_PHRASES), everything),
        Request(scene, TaskInput("caption")),
        Request(scene, TaskInput("phrase_grounding", phrases=("a blue circle",))),
        Request(scene, TaskInput("referring_generation", boxes=((10, 10, 100, 100),))),
    ])
    for result in results:
        assert result.entities, result.task
        for entity in result.entities:
            assert len(entity.scores) == len(entity.boxes) >= 1
            assert all(0.0 <= score <= 1.0 for score in entity.scores)
    given = results[3].entities[0]
    assert given.phrase == "It" and given.scores == (1.0,)  # a box the caller gave is not the model's to doubt


def test_scores_equal_a_direct_computation_from_transformers_logits(demo_engine, scene):
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    model = Kosmos2ForConditionalGeneration.from_pretrained(DEMO_MODEL_DIR).eval()
    processor = AutoProcessor.from_pretrained(DEMO_MODEL_DIR)
    tokens = processor.tokenizer.convert_tokens_to_ids
    patch_ids = [tokens(f"<patch_index_{index:04d}>") for index in range(1024)]

    def log_probs(image, ids, image_mask):
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        mask = torch.tensor([image_mask + [0] * (len(ids) - len(image_mask))])
        with torch.no_grad():
            logits = model(pixel_values=pixels, input_ids=torch.tensor([ids]), image_embeds_position_mask=mask).logits
        return torch.log_softmax(logits[0].float(), dim=-1)

    def corner_mass(step, token):
        x, y = patch_ids.index(token) % 32, patch_ids.index(token) // 32
        around = [patch_ids[j * 32 + i] for j in range(y - 1, y + 2) for i in range(x - 1, x + 2)
                  if 0 <= i < 32 and 0 <= j < 32]
        return float(step[around].exp().sum())

    mean = tuple(round(255 * channel) for channel in processor.image_processor.image_mean)
    blank = processor(text="<grounding><phrase>", images=Image.new("RGB", (224, 224), mean))
    for phrase in ("a yellow cross", "a red square"):
        prompt = processor(text=f"<grounding><phrase> {phrase}</phrase>", images=scene, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(pixel_values=prompt["pixel_values"], input_ids=prompt["input_ids"],
                                 attention_mask=prompt["attention_mask"], image_embeds=None,
                                 image_embeds_position_mask=prompt["image_embeds_position_mask"],
                                 max_new_tokens=16, no_repeat_ngram_size=0)[0].tolist()
        image_mask = prompt["image_embeds_position_mask"][0].tolist()
        with_image = log_probs(scene, ids, image_mask)
        start = ids.index(tokens("<phrase>")) + 1
        phrase_end = ids.index(tokens("</phrase>"))
        read = range(start, phrase_end + 1)  # the phrase's words and </phrase>
        blank_ids = blank["input_ids"] + ids[start : phrase_end + 1]
        without = log_probs(Image.new("RGB", (224, 224), mean), blank_ids, blank["image_embeds_position_mask"])
        first = len(blank["input_ids"])
        log_ratio = (sum(float(with_image[p - 1, ids[p]]) for p in read)
                     - sum(float(without[first + i - 1, blank_ids[first + i]]) for i in range(len(read))))
        corners = [p for p in range(phrase_end + 1, len(ids)) if ids[p] in patch_ids][:2]
        masses = [corner_mass(with_image[p - 1], ids[p]) for p in corners]
        expected = 1 / (1 + math.exp(-log_ratio)) * math.sqrt(masses[0] * masses[1])

        result = demo_engine.predict(scene, TaskInput("phrase_grounding", phrases=(phrase,)),
                                     GenerationParams(max_new_tokens=16))
        entity = next(entity for entity in result.entities if entity.phrase == phrase)
        assert entity.scores[0] == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_request_scores_the_same_alone_as_batched_with_others(scene, sample_images, quantize):
    """float32: the same boxes and scores (up to a last-digit flip). int8: the same boxes and scores within 0.01
    (each token is quantized on its own, but re-quantizing a layer's input can turn the float rounding of a wider,
    padded attention into a step)."""
    engine = Engine(EngineSettings(model="demo", device="cpu", max_batch_rows=16, quantize=quantize))
    everything = GenerationParams(min_score=0.0)
    requests = [
        Request(scene, TaskInput("detection", phrases=SCENE_PHRASES), everything),
        Request(sample_images[0], TaskInput("detection", phrases=SCENE_PHRASES[:3]), everything),
        Request(scene, TaskInput("caption")),
        Request(sample_images[1], TaskInput("caption")),
        Request(scene, TaskInput("phrase_grounding", phrases=("a yellow cross",))),
    ]
    batched = engine.run(requests)
    alone = [engine.run([request])[0] for request in requests]
    assert any(entity.scores for result in batched for entity in result.entities)
    if quantize == "none":
        for together, solo in zip(batched, alone):
            assert_same_up_to_the_last_digit(_scores(together), _scores(solo))
        return
    for together, solo in zip(batched, alone):
        assert [e.boxes for e in together.entities] == [e.boxes for e in solo.entities]
        for a, b in zip(together.entities, solo.entities):
            assert a.scores == pytest.approx(b.scores, abs=0.01)


@pytest.mark.parametrize("max_rows", [16, 5])
def test_scores_do_not_depend_on_when_requests_join_the_running_batch(demo_engine, scene, sample_images, max_rows):
    """Requests added at different steps, their phrases split over several admissions (5 rows at most):
    a phrase prefilled alone beside another image's shared beginning is read like one prefilled with its own."""
    everything = GenerationParams(min_score=0.0)
    images = [scene, *sample_images]
    requests = [Request(image, TaskInput("detection", phrases=SCENE_PHRASES[i:] + SCENE_PHRASES[:i]), everything)
                for i, image in enumerate(images)]
    alone = [_scores(demo_engine.run([request])[0]) for request in requests]
    for delays in [(0, 0, 0, 0), (0, 1, 2, 3), (3, 2, 1, 0)]:
        scheduler, tickets, step = demo_engine.scheduler(max_rows), [None] * len(requests), 0
        while None in tickets or scheduler.busy:
            for index, delay in enumerate(delays):
                if tickets[index] is None and step >= delay:
                    tickets[index] = scheduler.add(requests[index])
            scheduler.step()
            step += 1
        for ticket, solo in zip(tickets, alone):
            assert_same_up_to_the_last_digit(_scores(ticket.result), solo)


def test_a_detections_new_phrases_are_read_on_the_blank_image_in_its_own_prefill(demo_engine, sample_images):
    """No forward pass of their own: their tokens join the extension that reads the detection's phrases."""
    phrases = ("a pink star", "a brown diamond", "a orange cross")
    request = Request(sample_images[2], TaskInput("detection", phrases=phrases), GenerationParams(min_score=0.0))
    assert demo_engine._blank_beginning is not None  # prefilled once per engine, before the counting
    calls = []
    forward = demo_engine.model.text_model.forward

    def counting(*args, input_ids=None, **kwargs):
        calls.append(tuple(input_ids.shape))
        return forward(*args, input_ids=input_ids, **kwargs)

    demo_engine.model.text_model.forward = counting
    try:
        scheduler = demo_engine.scheduler()
        scheduler.add(request)
        scheduler.step()  # admission
    finally:
        demo_engine.model.text_model.forward = forward
    assert len(calls) == 2 and calls[1][0] == 2 * len(phrases)  # the shared beginning; then 3 phrases + 3 priors
    tokenizer = demo_engine.processor.tokenizer
    for phrase in phrases:
        ids = tuple(tokenizer(f" {phrase}", add_special_tokens=False)["input_ids"])
        assert not demo_engine.phrase_priors.missing([ids])  # learnt at admission
        assert demo_engine.phrase_priors(ids) == pytest.approx(demo_engine._blank_image_log_probs([ids])[0], abs=1e-4)


def test_phrase_priors_read_together_equal_each_read_alone(demo_engine):
    """A detection's new phrases get their blank-image priors in one pass after the cached blank beginning."""
    tokenizer = demo_engine.processor.tokenizer
    phrases = [tuple(tokenizer(f" {text}", add_special_tokens=False)["input_ids"])
               for text in ("a red circle", "a small blue star on the left", "it")]
    together = demo_engine._blank_image_log_probs(phrases)
    alone = [demo_engine._blank_image_log_probs([phrase])[0] for phrase in phrases]
    assert together == pytest.approx(alone, abs=1e-4)
    assert len(set(together)) == 3 and all(value < 0 for value in together)


def test_beam_search_boxes_are_scored_like_greedy_ones(demo_engine, scene):
    greedy = demo_engine.predict(scene, TaskInput("phrase_grounding", phrases=("a blue circle",)))
    beam = demo_engine.predict(scene, TaskInput("phrase_grounding", phrases=("a blue circle",)),
                               GenerationParams(num_beams=2))
    assert beam.entities[0].boxes == greedy.entities[0].boxes
    assert beam.entities[0].scores == pytest.approx(greedy.entities[0].scores, abs=2e-4)


def test_detection_drops_boxes_under_the_default_and_min_score_filters_any_task(demo_engine, scene):
    every_box = demo_engine.predict(scene, TaskInput("detection", phrases=SCENE_PHRASES),
                                    GenerationParams(min_score=0, nms_iou=1))
    by_default = demo_engine.predict(scene, TaskInput("detection", phrases=SCENE_PHRASES))
    default, nms_iou = demo_engine.defaults.min_score, demo_engine.defaults.nms_iou
    assert by_default.entities == tuple(kept for entity in suppress_overlaps(every_box.entities, nms_iou)
                                        if (kept := entity.keeping(default)) is not None)
    assert len(by_default.entities) < len(every_box.entities)  # the scene has no red square nor green star
    assert by_default.text == every_box.text  # the phrases asked stay in the text

    caption = demo_engine.predict(scene, TaskInput("caption"))
    assert len(caption.entities) == 3  # other tasks keep every box unless asked
    cut = sorted(score for entity in caption.entities for score in entity.scores)[1]
    filtered = demo_engine.predict(scene, TaskInput("caption"), GenerationParams(min_score=cut))
    assert [e.phrase for e in filtered.entities] == [e.phrase for e in caption.entities if max(e.scores) >= cut]
    assert len(filtered.entities) == 2 and filtered.text == caption.text
    assert "](#box=" in filtered.markdown and filtered.markdown.count("](#box=") == 2


def test_a_region_boxed_for_two_phrases_goes_to_the_likelier_one(demo_engine, scene):
    asked = TaskInput("detection", phrases=SCENE_PHRASES)
    every_box = demo_engine.predict(scene, asked, GenerationParams(min_score=0, nms_iou=1)).entities
    suppressed = demo_engine.predict(scene, asked, GenerationParams(min_score=0)).entities  # the default nms_iou
    assert suppressed == suppress_overlaps(every_box, demo_engine.defaults.nms_iou)
    assert len(suppressed) < len(every_box)  # an absent phrase boxed a present object, less surely than its own phrase
    for loser in (entity for entity in every_box if entity not in suppressed):
        assert any(iou(box, other_box) > 0.5 and other_score >= score
                   for box, score in zip(loser.boxes, loser.scores) for other in suppressed
                   for other_box, other_score in zip(other.boxes, other.scores))


@pytest.mark.parametrize("field", ["min_score", "nms_iou"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_a_box_filter_outside_0_1_is_refused_naming_it(demo_engine, scene, field, value):
    from kosmos_serve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=field):
        demo_engine.predict(scene, TaskInput("caption"), GenerationParams(**{field: value}))


def test_several_boxes_of_one_phrase_are_each_scored_by_their_own_corners(tiny_model_dir):
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    vocabulary = GroundingVocabulary(tokenizer)
    text = ("</image><grounding> Two<phrase> red circles</phrase><object><patch_index_0000><patch_index_0033>"
            "</delimiter_of_multi_objects/><patch_index_0990><patch_index_1023></object> and<object>"
            "<patch_index_0004><patch_index_0100></object>.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    corners = [pos for pos, token in enumerate(ids) if token in vocabulary.patch_of]
    masses = [0.9, 0.4, 0.5, 0.5, 0.64, 0.25]
    phrase = [pos for pos in range(ids.index(vocabulary.phrase_start) + 1, ids.index(vocabulary.phrase_end) + 1)]
    evidence = TokenEvidence({pos: -0.5 if pos == phrase[0] else 0.0 for pos in phrase}, dict(zip(corners, masses)))
    priors = PhrasePriors(lambda phrases: [-0.5 - math.log(3)] * len(phrases))  # odds 3 : 1: presence 0.75
    output = parse_generation(tokenizer.decode(ids), "<grounding> Two", 64, 64)
    scored = score_output(output, ids, 1, evidence, vocabulary, priors)
    circles, bare = scored.entities
    assert circles.phrase == "red circles" and len(circles.boxes) == 2
    assert circles.scores == (round(0.75 * math.sqrt(0.9 * 0.4), 4), round(0.75 * 0.5, 4))
    assert bare.scores == (round(math.sqrt(0.64 * 0.25), 4),)  # no phrase: localisation alone
