"""Build a small Kosmos-2 from nothing: a word-level tokenizer, the real processor, random weights.

The result is an ordinary `save_pretrained` folder, loaded by the same code as the real checkpoint,
so tests exercise the production path without the 6 GB download. Everything is deterministic:
the same seed writes the same tokenizer and the same weights.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch
from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration, Kosmos2Processor, XLMRobertaTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from kosmos_serve.training import shapes

# The checkpoint's image preprocessing: squash-resize to 224x224 (bicubic), no crop, CLIP mean/std.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
NUM_PATCH_INDEX_TOKENS = 1024
XLMR_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]

# The synthetic scenes' vocabulary first (so their training text tokenises compactly), then a few more words.
COLOURS = list(shapes.COLOURS) + ["white", "black", "grey"]
SHAPES = list(shapes.SHAPES) + ["rectangle", "ring", "heart"]
SIZES = ["small", "large", "big", "tiny"]
PLACES = ["left", "right", "top", "bottom", "middle", "centre", "corner"]
MODEL_CARD_SENTENCES = [
    "An image of a snowman warming himself by a fire.",
    "Describe this image in detail: The image features a snowman sitting by a campfire in the snow.",
    "He is wearing a hat, scarf, and gloves, with a pot nearby and a cup nearby.",
    "Question: What is special about this image? Answer: Near the snowman.",
    "Question: Where is the fire next to? Answer: It is snowman in a hat and scarf.",
    "What colour is this shape? What is in the picture? Describe this object. Which one is it?",
    "There is a person, a dog, a cat, a car, a tree, a house, a table and a cup on the grass.",
]


def training_corpus() -> list[str]:
    """Sentences covering the shapes vocabulary and the model card's prompts, for the tokenizer."""
    lines = list(MODEL_CARD_SENTENCES)
    for size, colour, shape in itertools.product(SIZES, COLOURS, SHAPES):
        lines.append(f"An image of a {size} {colour} {shape} next to the {shape}s.")
    for colour, shape, place in itertools.product(COLOURS, SHAPES, PLACES):
        lines.append(f"The {colour} {shape} on the {place} is above a {shape} and below two {colour} ones.")
    return lines


def build_tokenizer(corpus: list[str]) -> XLMRobertaTokenizer:
    """A word-level unigram tokenizer in XLM-R's id layout: every corpus word is one token.

    Each word of `corpus` is a piece (`▁red`); single characters, with and without `▁`, are
    low-scoring pieces that spell any other word. Whole words then always win, so "the purple
    star" is three tokens that a small model can learn from, not a dozen fragments.

    >>> build_tokenizer(["a red star."]).tokenize("a red star. A redder star")
    ['▁a', '▁red', '▁star', '.', '▁', 'A', '▁red', 'd', 'e', 'r', '▁star']
    """
    words = dict.fromkeys(word for line in corpus for word in re.findall(r"\w+|[^\w\s]", line))
    characters = sorted({character for line in corpus for character in line if not character.isspace()})
    pieces = {f"▁{word}": 0.0 for word in words}
    for character in characters:
        pieces.setdefault(f"▁{character}", -10.0)
        pieces.setdefault(character, -10.0)
    pieces.setdefault("▁", -20.0)
    vocab = [(token, 0.0) for token in XLMR_SPECIAL_TOKENS] + list(pieces.items()) + [("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=vocab)


def build_processor(tokenizer: XLMRobertaTokenizer) -> Kosmos2Processor:
    """The real `Kosmos2Processor` (tag and patch-index tokens) with the checkpoint's preprocessing."""
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"height": 224, "width": 224},
        resample=3,
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return Kosmos2Processor(image_processor, tokenizer, num_patch_index_tokens=NUM_PATCH_INDEX_TOKENS)


def tiny_config(
    vocab_size: int,
    *,
    text_width: int = 64,
    text_layers: int = 2,
    vision_width: int = 32,
    vision_layers: int = 2,
    patch_size: int = 32,
    init_std: float = 0.2,
) -> Kosmos2Config:
    """A Kosmos-2 config with the real token layout and very small layers (224 px input, 64 image tokens).

    The default `init_std` is ten times the checkpoint's, so a random model's tokens depend on the
    image and on positions: equality tests on it fail when either is wrong.
    """
    return Kosmos2Config(
        text_config={
            "vocab_size": vocab_size,
            "embed_dim": text_width,
            "layers": text_layers,
            "ffn_dim": text_width * 4,
            "attention_heads": 4,
            "max_position_embeddings": 2048,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "init_std": init_std,
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": vision_width * 4,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": max(2, vision_width // 64),
            "image_size": 224,
            "patch_size": patch_size,
        },
        latent_query_num=64,
    )


def build_tiny_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a random tiny Kosmos-2 (weights, config, tokenizer, processor) to `out_dir`."""
    out_dir = Path(out_dir)
    processor = build_processor(build_tokenizer(training_corpus()))
    torch.manual_seed(seed)
    model = Kosmos2ForConditionalGeneration(tiny_config(len(processor.tokenizer)))
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
