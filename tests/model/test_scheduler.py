"""Continuous batching: requests join and leave a running batch at any step, each answer its solo run's."""

import dataclasses

import pytest

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, Request
from kosmos_serve.engine.results import build_result
from kosmos_serve.tasks import Task, TaskInput

GREEDY = GenerationParams(max_new_tokens=16)


def comparable(result):
    """Everything that must not depend on batching (timings and cache state aside)."""
    return (result.raw_text, result.text, result.answer, result.entities, result.markdown, result.generated_tokens)


def through_generate(engine, request):
    """The reference: the request alone through transformers' `generate` (`torch.manual_seed(seed)` when sampling)."""
    prepared = engine.prepare(request)
    rows = engine.tokenise(prepared)
    features, seconds, cached = engine.features_for({row.image_key: request.image for row in rows})
    engine.generate_rows(rows, features, prepared.params, request.image.size)
    return build_result(prepared, rows, seconds, cached)


def streamed_into(engine, pieces):
    """An `on_tokens` callback that reads the engine's pieces as a stream's consumer does, appending the text."""
    stream = engine.text_stream()

    def read(piece):
        if text := stream.read(piece):
            pieces.append(text)

    return read


def mixed_requests(images):
    """Tasks, prompt lengths, token budgets, greedy and seeded sampling, beams: (request, streamed)."""
    sampled = dataclasses.replace(GREEDY, do_sample=True, seed=11, temperature=1.3)
    return [
        (Request(images[0], TaskInput(Task.CAPTION), GREEDY), False),
        (Request(images[1], TaskInput(Task.DETAILED_CAPTION), GenerationParams(max_new_tokens=5)), True),
        (Request(images[2], TaskInput(Task.PHRASE_GROUNDING, phrases=("a red circle",)), sampled), False),
        (Request(images[0], TaskInput(Task.GROUNDED_VQA, prompt="What is special about this image?"),
                 GenerationParams(max_new_tokens=24)), True),
        (Request(images[1], TaskInput(Task.DETECTION, phrases=("a circle", "two green squares")), GREEDY), True),
        (Request(images[2], TaskInput(Task.REFERRING_GENERATION, boxes=((10, 20, 150, 160),)),
                 GenerationParams(max_new_tokens=3)), False),
        (Request(images[0], TaskInput(Task.CAPTION), dataclasses.replace(sampled, seed=5, top_p=0.5)), True),
        (Request(images[1], TaskInput(Task.CAPTION), dataclasses.replace(GREEDY, num_beams=2)), False),
        (Request(images[2], TaskInput(Task.RAW, prompt="An image of", grounding=False),
                 GenerationParams(max_new_tokens=20, no_repeat_ngram_size=0)), False),
        (Request(images[0], TaskInput(Task.REGION_VQA, prompt="Where is the fire next to?", phrases=("the fire",),
                                      boxes=((5, 5, 120, 90),)), GREEDY), True),
    ]


def test_many_mixed_requests_arriving_mid_decode_each_equal_their_solo_generate(engine, sample_images):
    cases = mixed_requests(sample_images)
    scheduler = engine.scheduler(max_rows=4)  # fewer rows than requests: some wait, join as others leave
    tickets, streamed_text, widths = [], {}, []
    for index, (request, streamed) in enumerate(cases):  # one arrival every other step, while others decode
        pieces = streamed_text.setdefault(index, []) if streamed else None
        tickets.append(scheduler.add(request, on_tokens=streamed_into(engine, pieces) if streamed else None))
        for _ in range(2):
            scheduler.step()
            widths.append(len(scheduler.sequences))
    while scheduler.busy:
        scheduler.step()
        widths.append(len(scheduler.sequences))
    assert max(widths) == 4
    for ticket, (request, streamed) in zip(tickets, cases):
        assert ticket.error is None
        assert comparable(ticket.result) == comparable(through_generate(engine, request)), request
        assert comparable(ticket.result) == comparable(engine.run([request])[0])
    for index, pieces in streamed_text.items():  # streamed text: the same pieces as the request streamed alone
        solo = []
        alone = engine.scheduler()
        alone.add(cases[index][0], on_tokens=streamed_into(engine, solo))
        while alone.busy:
            alone.step()
        assert pieces == solo and pieces


def test_a_request_joins_a_running_batch_and_a_short_one_leaves_first(engine, sample_images):
    long = Request(sample_images[0], TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=24, no_repeat_ngram_size=0))
    short = Request(sample_images[1], TaskInput(Task.GROUNDED_VQA, prompt="What is it?"), GenerationParams(max_new_tokens=3))
    scheduler = engine.scheduler()
    first = scheduler.add(long)
    for _ in range(5):
        scheduler.step()
    assert len(scheduler.sequences) == 1 and first.rows[0].generated_tokens == 0
    second = scheduler.add(short)
    finished_at = {}
    step = 0
    while scheduler.busy:
        step += 1
        for ticket in scheduler.step():
            finished_at[id(ticket)] = step
        if step == 1:
            assert len(scheduler.sequences) == 2  # joined at the next step, beside the running row
    assert finished_at[id(second)] < finished_at[id(first)]  # the short one did not wait for the long one
    assert second.result.generated_tokens == 3 and first.result.generated_tokens > 3
    for ticket, request in ((first, long), (second, short)):
        assert comparable(ticket.result) == comparable(through_generate(engine, request))


def test_a_request_whose_caller_left_stops_alone_and_a_queued_one_never_runs(engine, sample_images):
    scheduler = engine.scheduler()
    gone = {"left": False}
    staying = scheduler.add(Request(sample_images[0], TaskInput(Task.CAPTION), GREEDY))
    leaving = scheduler.add(Request(sample_images[1], TaskInput(Task.CAPTION), GREEDY), should_stop=lambda: gone["left"])
    for _ in range(3):
        scheduler.step()
    gone["left"] = True
    never = scheduler.add(Request(sample_images[2], TaskInput(Task.CAPTION), GREEDY), should_stop=lambda: True)
    while scheduler.busy:
        scheduler.step()
    assert leaving.cancelled and leaving.result.generated_tokens <= 4
    assert never.cancelled and never.result.generated_tokens == 0 and never.features is None  # not even its image
    assert comparable(staying.result) == comparable(through_generate(engine, staying.request))


def test_a_row_whose_output_cannot_be_read_fails_its_request_alone(engine, sample_images, monkeypatch):
    """Reading a finished row (parse, score) raising fails that request with the error; the batch beside it and the
    requests after it go on (the engine thread must not die with it)."""
    parse = type(engine).parse
    broken_image = sample_images[1]

    def parse_or_fail(self, decoded_text, spec, image_size):
        if image_size == broken_image.size:
            raise ValueError("unreadable")
        return parse(self, decoded_text, spec, image_size)

    assert sample_images[0].size != broken_image.size
    monkeypatch.setattr(type(engine), "parse", parse_or_fail)
    scheduler = engine.scheduler()
    fine = scheduler.add(Request(sample_images[0], TaskInput(Task.CAPTION), GREEDY))
    broken = scheduler.add(Request(broken_image, TaskInput(Task.CAPTION), GREEDY))
    while scheduler.busy:
        scheduler.step()
    assert isinstance(broken.error, ValueError) and broken.result is None
    assert comparable(fine.result) == comparable(through_generate(engine, fine.request))
    after = scheduler.add(Request(sample_images[0], TaskInput(Task.CAPTION), GREEDY))
    while scheduler.busy:
        scheduler.step()
    assert comparable(after.result) == comparable(fine.result)


def test_seeded_sampling_is_reproducible_and_equals_generate_with_that_seed(engine, sample_images):
    sampled = GenerationParams(max_new_tokens=16, do_sample=True, seed=123, temperature=1.5)
    request = Request(sample_images[2], TaskInput(Task.CAPTION), sampled)
    neighbours = [Request(image, TaskInput(Task.CAPTION), GREEDY) for image in sample_images]
    together = engine.run([*neighbours, request, dataclasses.replace(request, params=dataclasses.replace(sampled, seed=9))])
    assert comparable(together[3]) == comparable(engine.run([request])[0]) == comparable(through_generate(engine, request))
    assert together[3].raw_text != together[4].raw_text  # the seed matters


@pytest.fixture(scope="module")
def int8_engine(tiny_model_dir):
    return Engine(EngineSettings(model=str(tiny_model_dir), device="cpu", quantize="int8"))


def test_an_int8_answer_does_not_depend_on_its_batch(int8_engine, sample_images):
    tasks = [TaskInput(Task.CAPTION), TaskInput(Task.GROUNDED_VQA, prompt="What is special about this image?"),
             TaskInput(Task.PHRASE_GROUNDING, phrases=("a red circle",))]
    requests = [Request(sample_images[i % 3], tasks[i % 3 if i < 6 else 0], GenerationParams(max_new_tokens=12 + i))
                for i in range(8)]
    alone = [comparable(int8_engine.run([request])[0]) for request in requests]
    assert [comparable(result) for result in int8_engine.run(requests)] == alone  # a batch of 8 rows


def test_phrases_on_one_image_prefill_their_shared_beginning_once_and_equal_their_solo_runs(engine, sample_images):
    phrases = ("a circle", "two green squares next to a red triangle", "it")  # remainders of different lengths
    detection = Request(sample_images[0], TaskInput(Task.DETECTION, phrases=phrases), GREEDY)
    caption = Request(sample_images[1], TaskInput(Task.CAPTION), GREEDY)
    engine.run([detection])  # the phrases' blank-image priors known, so the prefill below reads only the prompts
    fed = []
    forward = engine.model.text_model.forward

    def counting(*args, input_ids=None, **kwargs):
        fed.append(int(input_ids.numel()))
        return forward(*args, input_ids=input_ids, **kwargs)

    engine.model.text_model.forward = counting
    try:
        scheduler = engine.scheduler()
        tickets = [scheduler.add(detection), scheduler.add(caption)]
        scheduler.step()  # admission: the prefill
        prefill_tokens = sum(fed)
        while scheduler.busy:
            scheduler.step()
    finally:
        engine.model.text_model.forward = forward
    phrase_prompts = [row.input_ids for row in tickets[0].rows]
    # Shared: the image span and the tags up to `<phrase>`, which each row reads in its remainder (its phrase's
    # log-probabilities, for the boxes' scores, come from the steps after it).
    shared = phrase_prompts[0].index(engine.vocabulary.phrase_start)
    assert all(prompt[:shared] == phrase_prompts[0][:shared] for prompt in phrase_prompts)
    caption_prompt = tickets[1].rows[0].input_ids
    assert shared > 64
    beginnings = 2 * max(shared, len(caption_prompt))  # the phrases' shared beginning beside the caption, padded
    remainders = 4 * max(len(prompt) - shared for prompt in phrase_prompts)  # then each phrase's own tokens
    assert prefill_tokens == beginnings + remainders < sum(map(len, [*phrase_prompts, caption_prompt]))
    assert comparable(tickets[0].result) == comparable(through_generate(engine, detection))
    assert comparable(tickets[1].result) == comparable(through_generate(engine, caption))
    for phrase, raw_text in zip(phrases, tickets[0].result.raw_text.split("\n")):
        alone = Request(sample_images[0], TaskInput(Task.PHRASE_GROUNDING, phrases=(phrase,)), GREEDY)
        assert raw_text == through_generate(engine, alone).raw_text


def test_a_decode_step_appends_to_the_cache_in_place(engine, sample_images):
    scheduler = engine.scheduler()
    scheduler.add(Request(sample_images[0], TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=12)))
    scheduler.step()
    layer = scheduler.batch.cache.layers[0]
    scheduler.step()  # the first step after prefill moves the cache into a buffer with spare columns
    storage, width = layer.keys.data_ptr(), layer.keys.shape[-2]
    for step in range(1, 6):
        scheduler.step()
        assert layer.keys.shape[-2] == width + step and layer.keys.data_ptr() == storage  # no copy
    while scheduler.busy:
        scheduler.step()


def test_the_gpu_path_bfloat16_with_sdpa_runs_through_the_scheduler_on_the_cpu(tiny_model_dir, sample_images):
    import torch

    half = Engine(EngineSettings(model=str(tiny_model_dir), device="cpu", dtype="bfloat16", attention="sdpa"))
    assert half.dtype == torch.bfloat16 and half.model.weight_formats == {"vision": "bfloat16", "text": "bfloat16"}
    requests = [Request(sample_images[0], TaskInput(Task.CAPTION), GREEDY),
                Request(sample_images[1], TaskInput(Task.DETECTION, phrases=("a circle", "two green squares")), GREEDY),
                Request(sample_images[2], TaskInput(Task.CAPTION), dataclasses.replace(GREEDY, num_beams=2))]
    scheduler = half.scheduler()
    pieces = []
    tickets = [scheduler.add(requests[0], on_tokens=streamed_into(half, pieces)), *map(scheduler.add, requests[1:])]
    while scheduler.busy:
        scheduler.step()
    assert all(ticket.error is None for ticket in tickets)
    assert scheduler.batch is None  # every row left the batch
    caption, detection, beams = (ticket.result for ticket in tickets)
    streamed = "".join(pieces).replace(" ", "")
    assert caption.generated_tokens == 16 and streamed and caption.raw_text.replace(" ", "").endswith(streamed)
    assert detection.generated_tokens == 32 and len(detection.raw_text.split("\n")) == 2
    assert 0 < beams.generated_tokens <= 16
