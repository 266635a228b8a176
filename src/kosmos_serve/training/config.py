"""Training hyper-parameters (kept free of torch so the CLI can show them cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (all saved beside each checkpoint)."""

    steps: int = 1000
    batch_size: int = 16
    gradient_accumulation: int = 1
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    freeze_vision_steps: int = 0  # keep the vision encoder and resampler fixed for this many first steps
    # Weight of the location-attention loss (0: off; needs patch supervision): the decoder's lookup head
    # (scratch.LOOKUP_LAYER, head 0), while it writes a box's location tokens, is taught to look at
    # that box's patches, and image tokens to hold their patch's words for it to compare with the phrase.
    location_attention_weight: float = 0.0
    # Weight of the patch-supervision loss (0: off): each vision patch learns the words and box of the
    # grounded phrase it lies in (see kosmos_serve.training.patch_supervision).
    patch_supervision_weight: float = 0.0
    seed: int = 0
