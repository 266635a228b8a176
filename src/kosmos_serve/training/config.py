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
    # Weight of the location-attention loss (0: off): the last decoder layer's first head, where it
    # predicts a location token, is taught to look at the image token of that location's patch.
    location_attention_weight: float = 0.0
    seed: int = 0
