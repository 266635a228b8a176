"""The demo segmenter: its training lowers the loss and resumes where it stopped, and the shipped one, loaded as any
hub SAM, segments held-out scenes (its full held-out score is docs/demo-model.md's)."""

import random
import shutil
from pathlib import Path

import torch
from transformers import AutoProcessor, SamModel, SamProcessor

from kosmos_serve.training import demo_segmenter
from kosmos_serve.training.demo_segmenter import HELD_OUT_SEED, build_segmenter
from kosmos_serve.training.segmenter import (
    SegmenterTraining,
    held_out_ious,
    jittered_box,
    prompt_batch,
    segmentation_loss,
    shapes_scene,
    train_segmenter,
)

SEGMENTER_DIR = Path(demo_segmenter.__file__).parents[1] / "models" / "demo-segmenter"


def test_a_short_training_run_lowers_the_loss(tmp_path):
    model, processor = build_segmenter(seed=0)
    fixed = prompt_batch(processor, [shapes_scene(3, index) for index in range(4)], 2, random.Random(0))
    with torch.no_grad():
        before = segmentation_loss(model, *fixed).item()
    config = SegmenterTraining(steps=40, images_per_step=4, learning_rate=3e-3, warmup_steps=5)
    train_segmenter(model, processor, tmp_path, config, log=lambda line: None)
    with torch.no_grad():
        after = segmentation_loss(model, *fixed).item()
    assert after < 0.8 * before


def test_an_interrupted_run_continues_from_its_checkpoint_to_the_same_model(tmp_path):
    config = SegmenterTraining(steps=4, images_per_step=2, warmup_steps=1, checkpoint_every=2)
    whole = train_segmenter(*build_segmenter(seed=0), tmp_path / "whole", config, log=lambda line: None)
    train_segmenter(*build_segmenter(seed=0), tmp_path / "stopped", config, log=lambda line: None)
    shutil.rmtree(tmp_path / "stopped" / "final")  # what a run stopped after its step-2 checkpoint leaves
    lines = []
    resumed = train_segmenter(*build_segmenter(seed=0), tmp_path / "stopped", config, log=lines.append)
    assert lines[0] == f"continuing from {tmp_path / 'stopped' / 'checkpoint-000002'} (step 2 of 4)"
    expected = SamModel.from_pretrained(whole).state_dict()
    for name, value in SamModel.from_pretrained(resumed).state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)


def test_jittered_boxes_stay_inside_the_image_and_near_the_box():
    rng = random.Random(0)
    boxes = [jittered_box((10, 20, 110, 70), rng, width=120, height=80) for _ in range(500)]
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 < x2 <= 120 and 0 <= y1 < y2 <= 80
    assert max(abs(box[0] - 10) for box in boxes) > 5  # it does move: std 10 pixels for a side of 100
    assert sum(abs(box[1] - 20) for box in boxes) / len(boxes) < 5  # std 5 for a side of 50


def test_the_shipped_segmenter_loads_as_any_sam_and_segments_held_out_objects():
    model = SamModel.from_pretrained(SEGMENTER_DIR)
    processor = AutoProcessor.from_pretrained(SEGMENTER_DIR)
    assert isinstance(processor, SamProcessor)
    assert sum(path.stat().st_size for path in SEGMENTER_DIR.iterdir()) <= 10 * 2**20
    ious = held_out_ious(model, processor, HELD_OUT_SEED, scenes=10)
    assert len(ious) >= 20 and sum(ious) / len(ious) >= 0.7
