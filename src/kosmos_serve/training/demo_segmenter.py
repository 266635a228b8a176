"""The shipped demo segmenter (`--segmenter demo`): a small Segment Anything model for the demo model's scenes.

`kosmos-serve train-demo-segmenter --out DIR` builds a SamModel from a small config (a 256-pixel input, a
two-layer vision encoder of width 64), trains it with box prompts on the masks of fresh synthetic scenes
(`training/segmenter.py`), scores its masks on scenes of a seed never used in training, and leaves the model in
DIR/final (config, safetensors weights, processor config: what `SamModel.from_pretrained` and
`AutoProcessor.from_pretrained` load) with its scores in DIR/final/held-out-scores.txt. 14 minutes of one core's
CPU time (36 minutes on the shared, loaded 2-core machine: docs/demo-segmenter.md); an interrupted run continues
where it stopped when run again with the same DIR.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

from kosmos_serve.training.segmenter import SegmenterTraining, held_out_ious, summarise_ious, train_segmenter

IMAGE_SIZE, PATCH_SIZE = 256, 16  # the input's longer side, padded square; 16 x 16 image embeddings
VISION_WIDTH, VISION_LAYERS, EMBEDDING_WIDTH = 64, 2, 64
POSITION_FREQUENCY_STD = 1.0
USE_REL_POS = False
RECIPE = SegmenterTraining(steps=1500, images_per_step=6, prompts_per_image=4, learning_rate=3e-3, warmup_steps=50,
                           checkpoint_every=250, scene_seed=1, seed=0)
HELD_OUT_SCENES, HELD_OUT_SEED = 200, 2  # the demo Kosmos-2's held-out scenes (`data shapes --n 200 --seed 2`)
SCORES_FILE = "held-out-scores.txt"


def build_segmenter(seed: int) -> tuple[SamModel, SamProcessor]:
    """A fresh SamModel of the demo segmenter's size, and the processor that scales images to its input."""
    vision = SamVisionConfig(hidden_size=VISION_WIDTH, output_channels=EMBEDDING_WIDTH, num_hidden_layers=VISION_LAYERS,
                             num_attention_heads=2, mlp_dim=4 * VISION_WIDTH, image_size=IMAGE_SIZE,
                             patch_size=PATCH_SIZE, window_size=8, global_attn_indexes=[VISION_LAYERS - 1],
                             use_rel_pos=USE_REL_POS, num_pos_feats=EMBEDDING_WIDTH // 2,
                             initializer_range=0.02)  # transformers' default, 1e-10, leaves a fresh encoder inert
    prompt_encoder = SamPromptEncoderConfig(hidden_size=EMBEDDING_WIDTH, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    mask_decoder = SamMaskDecoderConfig(hidden_size=EMBEDDING_WIDTH, mlp_dim=4 * EMBEDDING_WIDTH,
                                        num_attention_heads=4, iou_head_hidden_dim=EMBEDDING_WIDTH)
    config = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt_encoder.to_dict(),
                       mask_decoder_config=mask_decoder.to_dict())
    torch.manual_seed(seed)
    low_res = IMAGE_SIZE // 4  # the mask decoder's output: 4 x the image embeddings
    image_processor = SamImageProcessor(size={"longest_edge": IMAGE_SIZE}, pad_size={"height": IMAGE_SIZE,
                                        "width": IMAGE_SIZE}, mask_size={"longest_edge": low_res},
                                        mask_pad_size={"height": low_res, "width": low_res})
    model = SamModel(config)
    # The random Fourier features that place boxes and image embeddings: transformers draws their frequencies with a
    # std of half the vision width (32 here, noise at this grid's scale); the original SAM's is 1.
    torch.nn.init.normal_(model.shared_image_embedding.positional_embedding, std=POSITION_FREQUENCY_STD)
    return model, SamProcessor(image_processor)


def build_demo_segmenter(out_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Train and score the demo segmenter; returns its folder (`out_dir`/final)."""
    model, processor = build_segmenter(RECIPE.seed)
    final = train_segmenter(model, processor, out_dir, RECIPE, log=log)
    scores = summarise_ious(held_out_ious(model, processor, HELD_OUT_SEED, HELD_OUT_SCENES))
    (final / SCORES_FILE).write_text(
        f"Held-out scenes: {HELD_OUT_SCENES}, seed {HELD_OUT_SEED} (training used seed {RECIPE.scene_seed}), "
        f"each object prompted with its exact box.\n{scores}\n"
    )
    log(scores)
    return final
