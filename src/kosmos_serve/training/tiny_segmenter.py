"""Build a small random Segment Anything model (SAM, SAM-HQ, SAM 2 or EdgeTAM) with its real transformers processor.

Like the tiny Kosmos-2 (`tiny_model.py`), the result is an ordinary `save_pretrained` folder that `--segmenter`
loads through the production code, so tests check the masks against transformers' own pipeline without a
download. Images are resized to 64 pixels a side instead of 1024, and every width is a few dozen; the same seed
writes the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import SamConfig, SamHQConfig, SamHQModel, SamHQProcessor, SamModel, SamProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from kosmos_serve.engine.segmentation import require_packages

INPUT_SIDE = 64  # pixels the processor resizes an image to (SAM: its longest side, then padded square)
PATCH = 8  # vision patch: an 8 x 8 image embedding, upscaled 4x by the mask decoder to 32 x 32 low-resolution masks
WIDTH = 32
INIT_STD = 0.2  # ten times the checkpoints': predicted IoUs and masks that differ from box to box
FAMILIES = ("sam", "sam_hq", "sam2", "edgetam")


def sam_parts(width: int = WIDTH) -> dict:
    """The sub-configs of a tiny SAM (SAM-HQ adds its own fields to the same)."""
    return {
        "vision_config": {"hidden_size": width, "output_channels": width, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": INPUT_SIDE, "patch_size": PATCH, "window_size": 4,
                          "global_attn_indexes": [1], "mlp_dim": 2 * width, "num_pos_feats": width // 2},
        "prompt_encoder_config": {"hidden_size": width, "image_size": INPUT_SIDE, "patch_size": PATCH,
                                  "mask_input_channels": 4},
        "mask_decoder_config": {"hidden_size": width, "mlp_dim": 2 * width, "num_attention_heads": 2,
                                "iou_head_hidden_dim": width},
    }


def sam_processor_parts() -> SamImageProcessorPil:
    """SAM's own image processor (PIL), at the tiny input size: longest side resized to 64, padded to 64 x 64."""
    low_res = INPUT_SIDE // PATCH * 4
    return SamImageProcessorPil(size={"longest_edge": INPUT_SIDE}, pad_size={"height": INPUT_SIDE, "width": INPUT_SIDE},
                                mask_size={"longest_edge": low_res}, mask_pad_size={"height": low_res, "width": low_res})


def sam2_config(family: str):
    """The config of a tiny SAM 2 (a Hiera backbone of five blocks in four stages) or EdgeTAM (SAM 2's heads on a
    RepViT backbone of four one-block stages, built by timm), both with four feature widths of 16 to 128."""
    from transformers import EdgeTamConfig, Sam2Config, TimmWrapperConfig

    widths = [16, 32, 64, 128]
    if family == "sam2":
        config_class = Sam2Config
        # Its global-attention block is the second of stage 3: one that opens a stage (pooled) must be windowed.
        backbone = {"model_type": "sam2_hiera_det_model", "hidden_size": widths[0], "image_size": [INPUT_SIDE] * 2,
                    "blocks_per_stage": [1, 1, 2, 1], "embed_dim_per_stage": widths,
                    "num_attention_heads_per_stage": [1, 1, 2, 2], "window_size_per_stage": [4, 4, 4, 2],
                    "global_attention_blocks": [3], "window_positional_embedding_background_size": [2, 2]}
    else:
        config_class = EdgeTamConfig
        backbone = TimmWrapperConfig(architecture="repvit_m1", model_args={
            "in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3], "embed_dim": widths, "depth": [1] * 4})
    return config_class(
        vision_config={"backbone_config": backbone, "backbone_channel_list": widths[::-1], "fpn_hidden_size": WIDTH,
                       "backbone_feature_sizes": [[INPUT_SIDE // 4 // 2**level] * 2 for level in range(3)]},
        prompt_encoder_config={"hidden_size": WIDTH, "image_size": INPUT_SIDE, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": WIDTH, "mlp_dim": 2 * WIDTH, "num_attention_heads": 2,
                             "iou_head_hidden_dim": WIDTH},
        initializer_range=INIT_STD,
    )


def tiny_sam2(family: str):
    """A tiny SAM 2 or EdgeTAM and SAM 2's processor, which needs torchvision (EdgeTAM's backbone timm too)."""
    config = sam2_config(family)
    require_packages(config, f"--family {family}")
    from transformers import AutoModelForMaskGeneration, Sam2Processor
    from transformers.models.sam2.image_processing_sam2 import Sam2ImageProcessor

    processor = Sam2Processor(Sam2ImageProcessor(size={"height": INPUT_SIDE, "width": INPUT_SIDE},
                                                 mask_size={"height": INPUT_SIDE // 4, "width": INPUT_SIDE // 4}))
    return AutoModelForMaskGeneration.from_config(config), processor


def build_tiny_segmenter(out_dir: str | Path, family: str = "sam", *, seed: int = 0) -> Path:
    """Write a random tiny segmenter of `family` (one of FAMILIES) with its processor to `out_dir`."""
    torch.manual_seed(seed)
    if family == "sam":
        model, processor = SamModel(SamConfig(**sam_parts(), initializer_range=INIT_STD)), SamProcessor(sam_processor_parts())
    elif family == "sam_hq":
        parts = sam_parts()
        parts["mask_decoder_config"]["vit_dim"] = WIDTH
        model, processor = SamHQModel(SamHQConfig(**parts, initializer_range=INIT_STD)), SamHQProcessor(sam_processor_parts())
    elif family in ("sam2", "edgetam"):
        model, processor = tiny_sam2(family)
    else:
        raise ValueError(f"family {family!r}: choose one of {', '.join(FAMILIES)}")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
