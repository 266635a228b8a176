"""Fine-tune (or train from scratch) a Kosmos-2 on grounded JSONL data.

Labels are the target tokens; image, prompt and padding positions are -100 (the processor makes no
labels, transformers#28599). AdamW with linear warm-up and decay, gradient accumulation, a
checkpoint every N steps, and `resume` that continues from the last checkpoint with the same steps
and the same data order, so an interrupted run ends where an uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import Kosmos2ForConditionalGeneration, Kosmos2Processor, get_linear_schedule_with_warmup

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import tokenise
from kosmos_serve.engine.loading import load_model
from kosmos_serve.errors import ModelLoadError
from kosmos_serve.images import load_image
from kosmos_serve.training.config import TrainConfig
from kosmos_serve.training.patch_supervision import PatchSupervision, box_attention_loss
from kosmos_serve.training.records import IGNORE_INDEX, DataError, Example
from kosmos_serve.training.scratch import LOOKUP_LAYER, build_scratch_model

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


@dataclass
class Batch:
    """Model inputs for a batch, right-padded, with labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_embeds_position_mask: torch.Tensor
    pixel_values: torch.Tensor
    labels: torch.Tensor


def load_for_training(model: str, seed: int) -> tuple[Kosmos2ForConditionalGeneration, Kosmos2Processor]:
    """A model to train: `scratch` builds a fresh small one, anything else loads like `--model` (float32)."""
    if model == "scratch":
        return build_scratch_model(seed)
    loaded, processor, family = load_model(EngineSettings(model=model, dtype="float32"))
    if family.processor_class is not Kosmos2Processor:
        raise ModelLoadError(f"Training takes a Kosmos-2 model; {model!r} is a {family.name} model.")
    return loaded, processor


def encode_example(processor: Kosmos2Processor, example: Example) -> tuple[list[int], list[int], list[int]]:
    """Token ids, image-position mask and labels of one example (EOS appended to the target).

    Only the target and its EOS are learnt: `<s>`, the image tokens and the prompt are -100.
    """
    prompt_ids, _ = tokenise(processor, example.prompt)
    ids, image_mask = tokenise(processor, example.prompt + example.target)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(f"{example.image_path}: prompt {example.prompt!r} does not tokenise as a prefix of its example")
    ids = ids + [processor.tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
    return ids, image_mask + [0], labels


class TrainingSet:
    """Examples with their encodings memoised and a bounded cache of preprocessed images (float16, 0.3 MB each)."""

    def __init__(self, processor: Kosmos2Processor, examples: Sequence[Example], cached_images: int = 8192):
        self.processor = processor
        self.examples = list(examples)
        self._encodings: dict[int, tuple[list[int], list[int], list[int]]] = {}
        self._pixels = functools.lru_cache(maxsize=cached_images)(self._pixel_values)

    def __len__(self) -> int:
        return len(self.examples)

    def _pixel_values(self, path: Path) -> torch.Tensor:
        pixels = self.processor.image_processor(load_image(path), return_tensors="pt")["pixel_values"][0]
        return pixels.to(torch.float16)

    def _encoding(self, index: int):
        if index not in self._encodings:
            self._encodings[index] = encode_example(self.processor, self.examples[index])
        return self._encodings[index]

    def batch(self, indices: Sequence[int]) -> Batch:
        """Tokenised, right-padded and stacked examples `indices`, with their images."""
        encoded = [self._encoding(i) for i in indices]
        width = max(len(ids) for ids, _, _ in encoded)
        pad = self.processor.tokenizer.pad_token_id

        def padded(values, fill):
            return torch.tensor([v + [fill] * (width - len(v)) for v in values])

        return Batch(
            input_ids=padded([ids for ids, _, _ in encoded], pad),
            attention_mask=padded([[1] * len(ids) for ids, _, _ in encoded], 0),
            image_embeds_position_mask=padded([mask for _, mask, _ in encoded], 0),
            pixel_values=torch.stack([self._pixels(self.examples[i].image_path) for i in indices]).float(),
            labels=padded([labels for _, _, labels in encoded], IGNORE_INDEX),
        )


def example_order(count: int, seed: int, first_sample: int, samples: int) -> list[int]:
    """Indices of samples `first_sample`.. in the run's order: a fresh seeded shuffle every epoch.

    The order depends only on (count, seed), so a resumed run draws exactly the same batches.
    """
    order = []
    for sample in range(first_sample, first_sample + samples):
        epoch, position = divmod(sample, count)
        order.append(epoch_permutation(count, seed, epoch)[position])
    return order


@functools.lru_cache(maxsize=2)
def epoch_permutation(count: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The shuffled order of `count` examples in one epoch."""
    permutation = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(permutation)
    return tuple(permutation)


def train(
    model: Kosmos2ForConditionalGeneration,
    processor: Kosmos2Processor,
    examples: TrainingSet,
    out_dir: Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> Path:
    """Train `model` on `examples`, checkpointing into `out_dir`; returns the final model folder."""
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    model.train()
    supervision = None
    if config.patch_supervision_weight > 0:
        supervision = PatchSupervision(model, processor, examples.examples).to(model.device)
    parameters = list(model.parameters()) + (list(supervision.parameters()) if supervision else [])
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    step = 0
    if resume:
        step = _restore(out_dir, model, supervision, optimizer, scheduler)
    samples_per_step = config.batch_size * config.gradient_accumulation
    guided = config.location_attention_weight > 0
    if guided:  # attention probabilities are only returned by the eager implementation
        if supervision is None or model.config.latent_query_num != supervision.side**2:
            raise DataError("--location-attention-weight needs --patch-supervision-weight and one image token per "
                            "patch (the --model scratch start).")
        attention_implementation = model.config.text_config._attn_implementation
        model.set_attn_implementation("eager")
        first_location_id = processor.tokenizer.convert_tokens_to_ids("<patch_index_0000>")
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc="training", unit="step")
    while step < config.steps:
        for part in (model.vision_model, model.image_to_text_projection):
            part.requires_grad_(step >= config.freeze_vision_steps)
        order = example_order(len(examples), config.seed, step * samples_per_step, samples_per_step)
        loss_sum = 0.0
        for micro in range(config.gradient_accumulation):
            chunk = order[micro * config.batch_size : (micro + 1) * config.batch_size]
            batch = examples.batch(chunk)
            inputs = {name: tensor.to(model.device) for name, tensor in vars(batch).items()}
            outputs = model(**inputs, output_attentions=guided)
            loss = outputs.loss
            if supervision:
                images = [examples.examples[i].image_path for i in chunk]
                patch_loss = supervision.loss(model, outputs.vision_model_output.last_hidden_state, images)
                loss = loss + config.patch_supervision_weight * patch_loss
            if guided:
                lookup_head = outputs.attentions[LOOKUP_LAYER][:, 0]
                attention_loss = box_attention_loss(lookup_head, inputs, supervision.corners_of(images), first_location_id)
                word_loss = supervision.word_loss(model, outputs.image_embeds, images)
                loss = loss + config.location_attention_weight * (attention_loss + word_loss)
            loss = loss / config.gradient_accumulation
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}")
        if on_step is not None:
            on_step(step, loss_sum)
        if step % config.checkpoint_every == 0 or step == config.steps:
            _checkpoint(out_dir, step, model, processor, supervision, optimizer, scheduler, config)
    bar.close()
    if guided:
        model.set_attn_implementation(attention_implementation)
    model.eval()
    final = out_dir / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    return final


def _checkpoint(out_dir: Path, step: int, model, processor, supervision, optimizer, scheduler, config: TrainConfig) -> None:
    folder = out_dir / f"checkpoint-{step:06d}"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
         "patch_supervision": supervision.state_dict() if supervision else None, "rng": torch.get_rng_state()},
        folder / STATE_FILE,
    )
    (folder / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
    for old in sorted(out_dir.glob("checkpoint-*"))[: -config.keep_checkpoints]:
        shutil.rmtree(old)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder in `out_dir`, if any."""
    complete = [folder for folder in sorted(Path(out_dir).glob("checkpoint-*")) if (folder / STATE_FILE).exists()]
    return complete[-1] if complete else None


def _restore(out_dir: Path, model, supervision, optimizer, scheduler) -> int:
    folder = latest_checkpoint(out_dir)
    if folder is None:
        logger.info("No checkpoint in %s; starting from step 0", out_dir)
        return 0
    restored = Kosmos2ForConditionalGeneration.from_pretrained(folder)
    model.load_state_dict(restored.state_dict())
    state = torch.load(folder / STATE_FILE, weights_only=False)
    if supervision:
        supervision.load_state_dict(state["patch_supervision"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    logger.info("Resumed from %s at step %d", folder, state["step"])
    return state["step"]
