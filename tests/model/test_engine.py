"""The engine against the reference (transformers' generate + post_process_generation) on a tiny model."""

import dataclasses

import pytest
import torch

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, ImageFeatureCache, Request
from kosmos_serve.errors import InvalidRequestError, ModelLoadError
from kosmos_serve.tasks import Task, TaskInput, build_prompts

NEW_TOKENS = 24
PARAMS = GenerationParams(max_new_tokens=NEW_TOKENS)

# Every task, with prompts of several lengths so batches need left padding.
TASK_INPUTS = [
    TaskInput(Task.CAPTION),
    TaskInput(Task.DETAILED_CAPTION),
    TaskInput(Task.PHRASE_GROUNDING, phrases=("a red circle",)),
    TaskInput(Task.REFERRING_COMPREHENSION, phrases=("the small blue square on the left of the big star",)),
    TaskInput(Task.REFERRING_GENERATION, boxes=((10, 20, 150, 160),)),
    TaskInput(Task.GROUNDED_VQA, prompt="What is special about this image?"),
    TaskInput(Task.REGION_VQA, prompt="Where is the fire next to?", phrases=("the fire",), boxes=((5, 5, 120, 90),)),
    TaskInput(Task.DETECTION, phrases=("a circle", "two green squares", "a star")),
    TaskInput(Task.RAW, prompt="An image of", grounding=False),
    TaskInput(Task.RAW, prompt="<grounding><phrase> It</phrase> is", boxes=((0, 0, 100, 100),)),
]


def all_requests(images):
    return [Request(image, task, PARAMS) for task in TASK_INPUTS for image in images]


def comparable(result):
    """Everything that must not depend on batching or caching."""
    return (result.raw_text, result.text, result.answer, result.entities, result.markdown, result.generated_tokens)


def test_every_task_alone_equals_the_reference(engine, reference, sample_images):
    for request in all_requests(sample_images):
        result = engine.run([request])[0]
        width, height = request.image.size
        specs = build_prompts(request.task, width, height)
        if request.task.task == Task.DETECTION:
            for spec, entity in zip(specs, result.entities):
                _, _, entities = reference(request.image, spec)
                assert entity.phrase in [name for name, _, _ in entities]
            assert result.raw_text == "\n".join(reference(request.image, spec)[0] for spec in specs)
            continue
        raw, text, entities = reference(request.image, specs[0])
        assert result.raw_text == raw
        assert result.text == text
        assert [entity.as_reference() for entity in result.entities] == entities


def test_batched_equals_unbatched_equals_cached(engine, sample_images):
    requests = all_requests(sample_images)
    engine.cache = ImageFeatureCache(0)
    alone = [comparable(engine.run([request])[0]) for request in requests]
    engine.cache = ImageFeatureCache(16)
    batched = engine.run(requests)
    assert [comparable(result) for result in batched] == alone
    assert not any(result.image_cached for result in batched)
    cached = engine.run(requests)
    assert [comparable(result) for result in cached] == alone
    assert all(result.image_cached and result.timings.vision == 0 for result in cached)
    assert engine.cache.hits >= len(sample_images)


def test_outputs_depend_on_image_and_prompt(engine, sample_images):
    """Guards the equality tests above: on a model whose output ignored its inputs they would prove nothing."""
    captions = engine.run([Request(image, TaskInput(Task.CAPTION), PARAMS) for image in sample_images])
    # A model that ignored its image would give one caption; this random tiny model's greedy tokens sit near
    # ties, so two of the three images may share a caption under another thread count's float rounding.
    assert len({result.raw_text for result in captions}) >= 2


def test_stock_left_padded_batches_diverge_and_ours_do_not(engine, reference, sample_images):
    """Documents the upstream bug our position fix removes (REFERENCE.md): if it starts passing, drop the fix."""
    model, processor = reference.model, reference.processor
    texts = ["<grounding> An image of", "<grounding> Question: What colour is the big shape on the left? Answer:"]
    images = sample_images[:2]
    processor.tokenizer.padding_side = "left"
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    stock = model.generate(**batch, max_new_tokens=NEW_TOKENS, no_repeat_ngram_size=3, use_cache=True)
    stock_raw = [processor.post_process_generation(t, cleanup_and_extract=False)
                 for t in processor.batch_decode(stock, skip_special_tokens=True)]
    ours = engine.run([Request(image, TaskInput(Task.RAW, prompt=text), PARAMS) for image, text in zip(images, texts)])
    alone = [engine.run([Request(image, TaskInput(Task.RAW, prompt=text), PARAMS)])[0].raw_text
             for image, text in zip(images, texts)]
    assert [result.raw_text for result in ours] == alone
    assert stock_raw != alone


def test_eager_and_sdpa_attention_give_the_same_tokens(tiny_model_dir, engine, sample_images):
    eager = Engine(EngineSettings(model=str(tiny_model_dir), device="cpu", attention="eager"))
    requests = all_requests(sample_images[:2])
    assert [comparable(r) for r in eager.run(requests)] == [comparable(r) for r in engine.run(requests)]
    features = [e.encode_images(sample_images) for e in (eager, engine)]
    torch.testing.assert_close(features[0], features[1])


def test_beam_search_batched_equals_alone(engine, reference, sample_images):
    beams = dataclasses.replace(PARAMS, num_beams=3)
    requests = [Request(image, TaskInput(Task.CAPTION), beams) for image in sample_images]
    requests.append(Request(sample_images[0], TaskInput(Task.GROUNDED_VQA, prompt="What is this thing?"), beams))
    alone = [comparable(engine.run([request])[0]) for request in requests]
    assert [comparable(result) for result in engine.run(requests)] == alone
    spec = build_prompts(TaskInput(Task.CAPTION), *sample_images[0].size)[0]
    assert alone[0][0] == reference(sample_images[0], spec, num_beams=3)[0]


def test_sampling_with_a_seed_is_reproducible_and_leaves_greedy_rows_alone(engine, sample_images):
    sampled = dataclasses.replace(PARAMS, do_sample=True, seed=7, temperature=1.5)
    greedy = Request(sample_images[1], TaskInput(Task.CAPTION), PARAMS)
    first = engine.run([Request(sample_images[0], TaskInput(Task.CAPTION), sampled), greedy])
    second = engine.run([greedy, Request(sample_images[0], TaskInput(Task.CAPTION), sampled)])
    assert first[0].raw_text == second[1].raw_text
    assert first[1].raw_text == second[0].raw_text == engine.run([greedy])[0].raw_text


def test_detection_runs_each_phrase_like_phrase_grounding(engine, sample_images):
    image = sample_images[0]
    phrases = ("a circle", "two green squares")
    detection = engine.predict(image, TaskInput(Task.DETECTION, phrases=phrases), PARAMS)
    assert detection.text == "a circle, two green squares"
    assert detection.prompt.splitlines() == [f"<grounding><phrase> {p}</phrase>" for p in phrases]
    singles = [engine.predict(image, TaskInput(Task.PHRASE_GROUNDING, phrases=(p,)), PARAMS) for p in phrases]
    assert detection.raw_text.split("\n") == [single.raw_text for single in singles]
    assert detection.generated_tokens == sum(single.generated_tokens for single in singles)
    for entity in detection.entities:
        assert detection.text[slice(*entity.span)] == entity.phrase


def test_result_reports_sizes_tokens_and_timings(engine, sample_images):
    result = engine.predict(sample_images[2], TaskInput(Task.CAPTION), PARAMS)
    assert result.image_size == (200, 320)
    assert 1 <= result.generated_tokens <= NEW_TOKENS
    assert result.timings.generation > 0
    payload = result.to_dict()
    assert payload["task"] == "caption" and payload["image_size"] == [200, 320]
    assert set(payload) >= {"text", "answer", "raw_text", "entities", "markdown", "timings"}


def test_exif_rotated_upload_gives_boxes_in_viewer_pixels(engine, sample_images):
    import io

    from PIL import Image

    from kosmos_serve.images import load_image

    upright = sample_images[0]
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # a camera stores it sideways ...
    exif = Image.Exif()
    exif[0x0112] = 8  # ... and says "rotate 90 CW to view"
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif)
    loaded = load_image(buffer.getvalue())
    assert loaded.size == upright.size
    request = TaskInput(Task.REFERRING_GENERATION, boxes=((0, 0, 320, 240),))
    assert comparable(engine.predict(loaded, request, PARAMS)) == comparable(engine.predict(upright, request, PARAMS))


def test_image_feature_cache_is_a_bounded_lru():
    cache = ImageFeatureCache(2)
    for key in "abc":
        cache.put(key, torch.zeros(1))
    assert cache.get("a") is None and len(cache) == 2
    cache.get("b")
    cache.put("d", torch.zeros(1))
    assert cache.get("c") is None and cache.get("b") is not None
    assert (cache.hits, cache.misses) == (2, 2)


@pytest.mark.parametrize(
    "params, message",
    [
        (GenerationParams(max_new_tokens=0), "max_new_tokens: Must be between 1 and"),
        (GenerationParams(max_new_tokens=10**6), "max_new_tokens: Must be between 1 and"),
        (GenerationParams(temperature=0), "temperature"),
        (GenerationParams(top_p=1.5), "top_p"),
        (GenerationParams(num_beams=0), "num_beams"),
        (GenerationParams(do_sample=True, temperature=float("inf")), "temperature: Input should be a finite number"),
        (GenerationParams(do_sample=True, temperature=1e-300), "temperature: Input should be greater than or equal to"),
        (GenerationParams(do_sample=True, seed=2**64), "seed: Input should be less than or equal to"),
        (GenerationParams(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    ],
)
def test_bad_generation_parameters_are_refused(engine, sample_images, params, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.predict(sample_images[0], TaskInput(Task.CAPTION), params)


def test_overlong_prompt_is_refused(engine, sample_images):
    with pytest.raises(InvalidRequestError, match="the limit is 2000"):
        engine.predict(sample_images[0], TaskInput(Task.GROUNDED_VQA, prompt="why " * 600), PARAMS)


def test_missing_models_say_how_to_fix_it(tmp_path):
    with pytest.raises(ModelLoadError, match="hf download microsoft/kosmos-2-patch14-224"):
        Engine(EngineSettings(model="microsoft/kosmos-2-patch14-224"))
    with pytest.raises(ModelLoadError, match="holds no complete Kosmos-2 checkpoint"):
        Engine(EngineSettings(model=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="is not a folder"):
        Engine(EngineSettings(model=str(tmp_path / "missing")))


def test_tiny_model_build_is_deterministic(tiny_model_dir, tmp_path):
    from kosmos_serve.training.tiny_model import build_tiny_model

    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is present")
def test_asking_for_a_missing_gpu_says_so(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="sees no CUDA GPU"):
        Engine(EngineSettings(model=str(tiny_model_dir), device="cuda"))
    with pytest.raises(ModelLoadError, match="Unknown device 'gpu0'"):
        Engine(EngineSettings(model=str(tiny_model_dir), device="gpu0"))
