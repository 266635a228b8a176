"""Build a small Kosmos-2.5 from nothing: a byte-level tokenizer with the family's tokens, the real processor, random
weights.

Like the tiny Kosmos-2 (`tiny_model.py`), the result is an ordinary `save_pretrained` folder that `--model` loads
through the production code, and the same seed writes the same folder. The tokenizer has the checkpoint's layout:
`<s>`, `<pad>`, `</s>`, `<unk>`, then (here) one token per byte, then the prompts and tags (`<ocr>`, `<image>`,
`</image>`, `<bbox>`, `</bbox>`, `<md>`) and the coordinate tokens `<x_N>`, `<y_N>` of the `<ocr>` boxes. As in the
checkpoint, it adds no tokens of its own around a text (the processor writes `<s><image>...</image>` itself),
`<image>` and `</image>` are special (decoding leaves them out) and the prompts, tags and coordinates are not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AddedToken,
    Kosmos2_5Config,
    Kosmos2_5ForConditionalGeneration,
    Kosmos2_5Processor,
    PreTrainedTokenizerFast,
)
from transformers.models.kosmos2_5.image_processing_pil_kosmos2_5 import Kosmos2_5ImageProcessorPil

from kosmos_serve.ocr import MARKDOWN_TAG, OCR_TAG

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
COORDINATES = 2048  # <x_0>..<x_2047> and <y_0>..<y_2047>: a page of up to 4096 patches resized to 2048 px a side
IMAGE_TOKENS = 16  # image features the text model reads (the checkpoint's: 2048)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every byte one token, no merges) with Kosmos-2.5's prompts, tags and coordinates.

    >>> tokenizer = build_tokenizer()
    >>> tokenizer.tokenize("<ocr><bbox><x_5><y_9><x_20><y_30></bbox>Hi\\n")
    ['<ocr>', '<bbox>', '<x_5>', '<y_9>', '<x_20>', '<y_30>', '</bbox>', 'H', 'i', 'Ċ']
    >>> tokenizer.decode(tokenizer("<image><s></image><md>Hi")["input_ids"], skip_special_tokens=True)
    '<md>Hi'
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return with_family_tokens(backend)


def with_family_tokens(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A byte-level BPE `backend` (its vocabulary starting with `SPECIAL_TOKENS`) as a Kosmos-2.5 tokenizer: the
    checkpoint's special tokens, then its prompts, tags and coordinates added."""
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<image>", "eoi_token": "</image>", "image_token": "<s>"},
    )
    tags = [OCR_TAG, "<image>", "</image>", "<bbox>", "</bbox>", MARKDOWN_TAG]
    coordinates = [f"<{axis}_{value}>" for axis in "xy" for value in range(COORDINATES)]
    tokenizer.add_tokens([AddedToken(token, special=token in ("<image>", "</image>"), normalized=False)
                          for token in tags + coordinates])
    return tokenizer


def tiny_config(vocab_size: int, *, text_width: int = 64, vision_width: int = 32, init_std: float = 0.2) -> Kosmos2_5Config:
    """A Kosmos-2.5 config with the checkpoint's patches (16 px, up to 4096) and very small layers.

    The default `init_std` is ten times the checkpoint's, so a random model's tokens depend on the image and on
    positions: equality tests on it fail when either is wrong.
    """
    return Kosmos2_5Config(
        text_config={
            "vocab_size": vocab_size,
            "embed_dim": text_width,
            "layers": 2,
            "ffn_dim": text_width * 4,
            "attention_heads": 4,
            "max_position_embeddings": 2048,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "init_std": init_std,
        },
        vision_config={
            "hidden_size": vision_width,
            "patch_embed_hidden_size": 16 * 16 * 3,
            "intermediate_size": vision_width * 4,
            "head_dim": 16,
            "num_hidden_layers": 1,  # attention over 4096 patches: the tiny model's most costly part
            "num_attention_heads": 2,
            "initializer_range": init_std,
        },
        latent_query_num=IMAGE_TOKENS,
        initializer_range=init_std,  # the image-to-text projection's
    )


def build_tiny_kosmos25(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a random tiny Kosmos-2.5 (weights, config, tokenizer, processor) to `out_dir`."""
    out_dir = Path(out_dir)
    processor = Kosmos2_5Processor(Kosmos2_5ImageProcessorPil(), build_tokenizer(), num_image_tokens=IMAGE_TOKENS)
    torch.manual_seed(seed)
    model = Kosmos2_5ForConditionalGeneration(tiny_config(len(processor.tokenizer)))
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
