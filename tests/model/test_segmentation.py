"""Masks from boxes (`--segmenter`) against transformers' own SAM pipeline run one box at a time, on tiny models."""

import io
import threading
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from PIL import Image

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, Request
from kosmos_serve.engine.segmentation import Segmenter
from kosmos_serve.errors import InvalidRequestError, ModelLoadError
from kosmos_serve.images import image_digest, load_image
from kosmos_serve.tasks import Task, TaskInput
from kosmos_serve.training.tiny_segmenter import build_tiny_segmenter

MASKS = GenerationParams(max_new_tokens=24, masks=True, min_score=0.0)
# A predicted IoU may differ in its last digit: float32 rounding in a decoder call over several boxes (as box scores).
SCORE_ROUNDING = 1.0001e-4
BOXES = ((10, 20, 150, 160), (0, 0, 90, 60))


def reference_masks(folder, image, boxes):
    """Each box's mask (bool array) and predicted IoU, by transformers alone: processor, model, post_process_masks."""
    from transformers import AutoModelForMaskGeneration, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForMaskGeneration.from_pretrained(folder).eval()
    answers = []
    for box in boxes:
        inputs = processor(images=image, input_boxes=[[[float(v) for v in box]]], return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs, multimask_output=False)
        sizes = [inputs[name] for name in ("original_sizes", "reshaped_input_sizes") if name in inputs]
        mask = processor.post_process_masks(outputs.pred_masks, *sizes)[0][0, 0].numpy()
        answers.append((mask, round(float(outputs.iou_scores[0, 0, 0]), 4)))
    return answers


def assert_faithful(result, image, folder):
    boxes = [box for entity in result.entities for box in entity.pixel_boxes]
    made = [(mask, score) for entity in result.entities for mask, score in zip(entity.masks, entity.mask_scores)]
    assert boxes and len(made) == len(boxes)
    for (mask, score), (expected, expected_score) in zip(made, reference_masks(folder, image, boxes)):
        assert mask.size == (image.height, image.width)
        assert np.array_equal(mask.to_array(), expected)
        assert abs(score - expected_score) <= SCORE_ROUNDING
    return made


@pytest.fixture(scope="module")
def sam_hq_dir(tmp_path_factory):
    return build_tiny_segmenter(tmp_path_factory.mktemp("tiny-sam-hq"), "sam_hq", seed=1)


def test_masks_equal_the_segmenter_run_alone_one_box_at_a_time(segmenting_engine, tiny_segmenter_dir, sample_images):
    for image in sample_images:
        result = segmenting_engine.predict(image, TaskInput(Task.REFERRING_GENERATION, boxes=BOXES), MASKS)
        made = assert_faithful(result, image, tiny_segmenter_dir)
        pixels = [mask.to_array().mean() for mask, _ in made]
        assert any(0 < share < 1 for share in pixels)  # real masks, not all or nothing


def test_sam_hq_takes_its_paired_embeddings(tiny_model_dir, sam_hq_dir, sample_images):
    engine = Engine(EngineSettings(model=str(tiny_model_dir), segmenter=str(sam_hq_dir), device="cpu"))
    image = sample_images[1]
    result = engine.predict(image, TaskInput(Task.REFERRING_GENERATION, boxes=BOXES), MASKS)
    assert engine.segmenter.model_type == "sam_hq"
    assert_faithful(result, image, sam_hq_dir)


def test_batched_requests_get_the_masks_they_get_alone(segmenting_engine, sample_images):
    requests = [Request(image, task, MASKS) for image in sample_images
                for task in (TaskInput(Task.REFERRING_GENERATION, boxes=BOXES),
                             TaskInput(Task.DETECTION, phrases=("a circle", "a star")),
                             TaskInput(Task.REGION_VQA, prompt="Where is the fire next to?", phrases=("the fire",),
                                       boxes=((5, 5, 120, 90),)))]
    segmenting_engine.segmenter.cache.clear()
    alone = [segmenting_engine.run([request])[0].entities for request in requests]
    segmenting_engine.segmenter.cache.clear()
    together = [result.entities for result in segmenting_engine.run(requests)]
    assert together == alone
    boxes = sum(len(entity.pixel_boxes) for entities in alone for entity in entities)
    assert boxes >= len(sample_images) * 3 and boxes == sum(len(e.masks) for entities in alone for e in entities)


def embedding_threads(segmenter, monkeypatch) -> list[str]:
    """The name of the thread of each image embedding `segmenter` computes from now on."""
    threads, embed = [], segmenter.model.get_image_embeddings
    monkeypatch.setattr(segmenter.model, "get_image_embeddings",
                        lambda *args, **kwargs: threads.append(threading.current_thread().name) or embed(*args, **kwargs))
    return threads


def test_an_images_embedding_is_computed_once_in_the_segmenters_thread(segmenting_engine, sample_images, monkeypatch):
    segmenter = segmenting_engine.segmenter
    segmenter.cache.clear()
    threads = embedding_threads(segmenter, monkeypatch)
    image = sample_images[2]
    first = segmenting_engine.predict(image, TaskInput(Task.REFERRING_GENERATION, boxes=BOXES[:1]), MASKS)
    second = segmenting_engine.predict(image, TaskInput(Task.REFERRING_GENERATION, boxes=BOXES), MASKS)
    assert len(threads) == 1 and threads[0].startswith("segmenter")  # started on admission, beside Kosmos-2's work
    assert second.entities[0].masks[0] == first.entities[0].masks[0]
    assert first.timings.segmentation > 0 and "segmentation_seconds" in first.to_dict()["timings"]


def test_a_failed_embedding_fails_its_request_and_is_not_kept(segmenting_engine, sample_images, monkeypatch):
    segmenter = segmenting_engine.segmenter
    segmenter.cache.clear()
    image, task = sample_images[1], TaskInput(Task.REFERRING_GENERATION, boxes=BOXES[:1])
    expected = segmenting_engine.predict(image, task, MASKS).entities[0].masks
    segmenter.cache.clear()
    embed = segmenter.model.get_image_embeddings
    monkeypatch.setattr(segmenter.model, "get_image_embeddings", Mock(side_effect=RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        segmenting_engine.predict(image, task, MASKS)
    monkeypatch.setattr(segmenter.model, "get_image_embeddings", embed)
    assert segmenting_engine.predict(image, task, MASKS).entities[0].masks == expected


def test_all_boxes_of_a_result_go_through_one_decoder_call(segmenting_engine, sample_images):
    calls = []
    decoder = segmenting_engine.segmenter.model.mask_decoder
    handle = decoder.register_forward_hook(lambda module, args, output: calls.append(output[0].shape))
    try:
        result = segmenting_engine.predict(sample_images[0], TaskInput(Task.REFERRING_GENERATION, boxes=BOXES), MASKS)
    finally:
        handle.remove()
    assert len(calls) == 1 and calls[0][1] == sum(len(entity.pixel_boxes) for entity in result.entities) == 2


def test_masks_are_in_the_pixels_a_viewer_sees(segmenting_engine, tiny_segmenter_dir, sample_images):
    upright = sample_images[1]
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # a camera stores it sideways and says how to turn it
    exif = Image.Exif()
    exif[0x0112] = 8
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif)
    loaded = load_image(buffer.getvalue())
    result = segmenting_engine.predict(loaded, TaskInput(Task.REFERRING_GENERATION, boxes=BOXES), MASKS)
    assert_faithful(result, upright, tiny_segmenter_dir)


def test_without_masks_asked_entities_carry_none(segmenting_engine, sample_images):
    result = segmenting_engine.predict(sample_images[0], TaskInput(Task.REFERRING_GENERATION, boxes=BOXES),
                                       GenerationParams(max_new_tokens=8))
    assert all(entity.masks == () and entity.mask_scores == () for entity in result.entities)
    assert "masks" not in result.to_dict()["entities"][0] and "segmentation_seconds" not in result.to_dict()["timings"]


def test_masks_without_a_segmenter_are_refused_saying_how_to_load_one(engine, sample_images):
    with pytest.raises(InvalidRequestError, match="--segmenter") as raised:
        engine.predict(sample_images[0], TaskInput(Task.CAPTION), MASKS)
    assert raised.value.field == "masks"


def test_a_model_that_is_no_segmenter_fails_at_start_up_in_one_line(tiny_model_dir):
    with pytest.raises(ModelLoadError) as raised:
        Segmenter(EngineSettings(segmenter=str(tiny_model_dir)), torch.device("cpu"), torch.float32)
    message = raised.value.message
    assert "'kosmos-2' model, not a Segment Anything model" in message and "sam, " in message and "\n" not in message


def test_the_demo_segmenter_is_named_when_it_is_missing(monkeypatch, tmp_path):
    from kosmos_serve.engine import loading

    monkeypatch.setattr(loading, "DEMO_SEGMENTER_DIR", tmp_path / "demo-segmenter")
    with pytest.raises(ModelLoadError, match="demo segmenter is missing"):
        loading.resolve_source("demo", option="--segmenter")


def test_masks_survive_the_score_threshold_with_their_boxes(segmenting_engine, sample_images):
    image = sample_images[0]
    result = segmenting_engine.predict(image, TaskInput(Task.REFERRING_GENERATION, boxes=BOXES), MASKS)
    entity = result.entities[0]
    kept = entity.keeping(1.0)  # boxes given in the prompt score 1.0
    assert kept.masks == entity.masks and kept.mask_scores == entity.mask_scores
    assert image_digest(image) in segmenting_engine.segmenter.cache._entries
