"""Train a Segment Anything model (transformers' SamModel) on the synthetic shapes' masks, with boxes as prompts.

Each step draws fresh scenes (`shapes.draw_scene_with_masks`, seeded per scene like the shapes datasets), prompts
the model with each object's box jittered as in SAM's training (noise of 10% of the box's side per coordinate, at
most 20 pixels), and learns the object's visible pixels: binary cross-entropy and dice between the decoder's mask
logits (one mask per box) and the share of each of their cells that the object covers, so that a logit of 0 marks
the boundary `post_process_masks` draws, and the squared error of the predicted IoU (the model's quality score)
against the IoU its mask reaches. Scoring goes the way serving goes: the processor, the
model, and `post_process_masks` back to the image's own pixels, whose mask is compared with the drawn one.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SamModel, SamProcessor, get_linear_schedule_with_warmup

from kosmos_serve.training.shapes import SceneObject, draw_scene_with_masks

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
BOX_NOISE, MAX_BOX_NOISE = 0.1, 20.0  # SAM's box jitter: std of 10% of the box's side, at most 20 pixels


@dataclass(frozen=True)
class Scene:
    """One synthetic scene: its image, its objects (boxes) and each object's visible pixels."""

    image: Image.Image
    objects: list[SceneObject]
    masks: list[np.ndarray]


@dataclass(frozen=True)
class SegmenterTraining:
    """Hyper-parameters of one segmenter training run (saved with each checkpoint)."""

    steps: int = 1000
    images_per_step: int = 8
    prompts_per_image: int = 2
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    checkpoint_every: int = 200
    scene_seed: int = 1  # scenes "shapes:{scene_seed}:{index}", as `kosmos-serve data shapes --seed` draws them
    seed: int = 0  # box choice and jitter


def shapes_scene(seed: int, index: int) -> Scene:
    """Scene `index` of the shapes dataset of `seed`: the image `write_shapes_dataset` saves, and its masks."""
    return Scene(*draw_scene_with_masks(random.Random(f"shapes:{seed}:{index}")))


def jittered_box(box: Sequence[int], rng: random.Random, width: int, height: int) -> list[float]:
    """`box` with each coordinate moved by SAM's noise, kept inside the image and at least a pixel wide and tall."""
    x1, y1, x2, y2 = box
    noise = [min(MAX_BOX_NOISE, BOX_NOISE * side) for side in (x2 - x1, y2 - y1)]
    x1, x2 = (min(max(x + rng.gauss(0.0, noise[0]), 0.0), width) for x in (x1, x2))
    y1, y2 = (min(max(y + rng.gauss(0.0, noise[1]), 0.0), height) for y in (y1, y2))
    return [min(x1, x2 - 1), min(y1, y2 - 1), max(x2, x1 + 1), max(y2, y1 + 1)]


def prompt_batch(processor: SamProcessor, scenes: Sequence[Scene], prompts: int, rng: random.Random):
    """Model inputs for `prompts` jittered boxes per scene (distinct objects while there are enough), and each box's
    target: its object's visible pixels at the model's input size, as fractions (batch, prompts, size, size)."""
    boxes, chosen = [], []
    for scene in scenes:
        order = rng.sample(range(len(scene.objects)), len(scene.objects))
        picks = [order[i % len(order)] for i in range(prompts)]
        width, height = scene.image.size
        boxes.append([jittered_box(scene.objects[i].box, rng, width, height) for i in picks])
        chosen.append(picks)
    inputs = processor(images=[scene.image for scene in scenes], input_boxes=boxes, return_tensors="pt")
    side = inputs["pixel_values"].shape[-1]
    targets = torch.zeros(len(scenes), prompts, side, side)
    for row, (scene, picks, (height, width)) in enumerate(zip(scenes, chosen, inputs["reshaped_input_sizes"].tolist())):
        masks = torch.from_numpy(np.stack([scene.masks[i] for i in picks])).float()[None]
        targets[row, :, :height, :width] = F.interpolate(masks, (height, width), mode="area")[0]
    return inputs, targets


def segmentation_loss(model: SamModel, inputs, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus dice of each prompt's mask logits against the share of each of their cells that its object
    covers, plus the squared error of its predicted IoU."""
    outputs = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False)
    logits = outputs.pred_masks[:, :, 0]
    coverage = F.adaptive_avg_pool2d(targets, logits.shape[-2:])
    cross_entropy = F.binary_cross_entropy_with_logits(logits, coverage)
    probabilities, coverage = logits.sigmoid().flatten(2), coverage.flatten(2)
    dice = 1 - (2 * (probabilities * coverage).sum(-1) + 1) / (probabilities.sum(-1) + coverage.sum(-1) + 1)
    with torch.no_grad():
        predicted, truth = (logits > 0).flatten(2).float(), (coverage > 0.5).float()
        reached = (predicted * truth).sum(-1) / ((predicted + truth).clamp(max=1).sum(-1) + 1e-6)
    return cross_entropy + dice.mean() + F.mse_loss(outputs.iou_scores[:, :, 0], reached)


def train_segmenter(
    model: SamModel,
    processor: SamProcessor,
    out_dir: str | Path,
    config: SegmenterTraining,
    log: Callable[[str], None] = logger.info,
) -> Path:
    """Train `model` on fresh shapes scenes, checkpointing into `out_dir` and continuing from its newest checkpoint;
    returns the final model's folder (`out_dir`/final). Scenes and jitter depend on the step alone, so a resumed run
    sees what an uninterrupted one would."""
    out_dir = Path(out_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    step = _restore(out_dir, model, optimizer, scheduler, log)
    model.train()
    while step < config.steps:
        rng = random.Random(f"segmenter:{config.seed}:{step}")
        first = step * config.images_per_step
        scenes = [shapes_scene(config.scene_seed, first + i) for i in range(config.images_per_step)]
        loss = segmentation_loss(model, *prompt_batch(processor, scenes, config.prompts_per_image, rng))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 50 == 0 or step == 1:
            log(f"step {step}/{config.steps} loss {loss.item():.4f}")
        if step % config.checkpoint_every == 0 and step < config.steps:
            _checkpoint(out_dir, step, model, processor, optimizer, scheduler, config)
    model.eval()
    final = out_dir / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    return final


def _checkpoint(out_dir: Path, step: int, model, processor, optimizer, scheduler, config: SegmenterTraining) -> None:
    folder = out_dir / f"checkpoint-{step:06d}"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "config": asdict(config)}, folder / STATE_FILE)
    for old in sorted(out_dir.glob("checkpoint-*"))[:-1]:
        shutil.rmtree(old)


def _restore(out_dir: Path, model, optimizer, scheduler, log: Callable[[str], None]) -> int:
    complete = [folder for folder in sorted(out_dir.glob("checkpoint-*")) if (folder / STATE_FILE).exists()]
    if not complete:
        return 0
    model.load_state_dict(SamModel.from_pretrained(complete[-1]).state_dict())
    state = torch.load(complete[-1] / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log(f"continuing from {complete[-1]} (step {state['step']} of {state['config']['steps']})")
    return state["step"]


@torch.no_grad()
def segment(model: SamModel, processor: SamProcessor, image: Image.Image, boxes: Sequence[Sequence[float]]):
    """Each box's mask in the image's pixels ((boxes, height, width) bool) and quality score, as serving makes them:
    the processor, the model (one mask per box) and `post_process_masks`."""
    inputs = processor(images=image, input_boxes=[[list(box) for box in boxes]], return_tensors="pt")
    outputs = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False)
    masks = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    return masks[0][:, 0].numpy(), outputs.iou_scores[0, :, 0].numpy()


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape (1.0 when both are empty)."""
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


def held_out_ious(model: SamModel, processor: SamProcessor, seed: int, scenes: int) -> list[float]:
    """The mask IoU of every object of the first `scenes` scenes of `seed`, prompted with its exact box."""
    model.eval()
    ious = []
    for index in range(scenes):
        scene = shapes_scene(seed, index)
        masks, _ = segment(model, processor, scene.image, [obj.box for obj in scene.objects])
        ious += [mask_iou(predicted, truth) for predicted, truth in zip(masks, scene.masks)]
    return ious


def summarise_ious(ious: Sequence[float]) -> str:
    """Mean IoU and the share of objects at IoU >= 0.5 and >= 0.9, as one line."""
    share = {bound: sum(iou >= bound for iou in ious) / len(ious) for bound in (0.5, 0.9)}
    return (f"mean mask IoU {sum(ious) / len(ious):.3f} over {len(ious)} objects; "
            f"IoU >= 0.5: {share[0.5]:.1%}, >= 0.9: {share[0.9]:.1%}; lowest {min(ious):.3f}")
