"""Build a small Kosmos-2 from nothing: local sentencepiece tokenizer, the real processor, random weights.

The result is an ordinary `save_pretrained` folder, loaded by the same code as the real checkpoint,
so tests exercise the production path without the 6 GB download. Everything is deterministic:
the same seed writes the same tokenizer and the same weights.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import sentencepiece
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


def build_tokenizer(corpus: list[str], vocab_size: int = 600) -> XLMRobertaTokenizer:
    """Train a unigram sentencepiece model in memory and wrap it in XLM-R's id layout."""
    model_bytes = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model_bytes,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        seed_sentencepiece_size=100_000,
        minloglevel=2,
    )
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes.getvalue())
    own_specials = {processor.unk_id(), processor.bos_id(), processor.eos_id()}
    pieces = [
        (processor.id_to_piece(i), processor.get_score(i))
        for i in range(processor.get_piece_size())
        if i not in own_specials
    ]
    vocab = [(token, 0.0) for token in XLMR_SPECIAL_TOKENS] + pieces + [("<mask>", 0.0)]
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


# The size of the shipped demo model (trained from scratch on synthetic scenes): an 8x8 patch grid,
# so the resampler's 64 latent queries can start one per patch (see `start_with_spatial_codes`).
DEMO_SIZE = {"text_width": 192, "text_layers": 4, "vision_width": 192, "vision_layers": 4, "patch_size": 28}
CODE_SHARE = 0.5  # of each attention head's dimensions, the share that starts as a position code


def build_scratch_model(seed: int = 0) -> tuple[Kosmos2ForConditionalGeneration, Kosmos2Processor]:
    """A fresh demo-size Kosmos-2 with the checkpoint's initialisation scale, ready to train."""
    processor = build_processor(build_tokenizer(training_corpus()))
    torch.manual_seed(seed)
    config = tiny_config(len(processor.tokenizer), init_std=0.02, **DEMO_SIZE)
    model = Kosmos2ForConditionalGeneration(config)
    start_with_spatial_codes(model, processor)
    return model, processor


def grid_codes(side: int, width: int, sharp: bool = False) -> torch.Tensor:
    """2D sinusoidal codes for the cells of a `side` x `side` grid: row in one half, column in the other.

    Smooth codes (geometric frequencies) keep neighbouring cells similar; sharp ones (frequencies
    up to pi per cell) make each cell's code most similar to itself only.

    >>> grid_codes(32, 8).shape
    torch.Size([1024, 8])
    """
    quarter = width // 4
    steps = torch.arange(quarter, dtype=torch.float32)
    frequencies = torch.pi * (steps + 1) / quarter if sharp else 100.0 ** (-steps / quarter)
    cells = torch.arange(side * side)
    rows, columns = (cells // side).float(), (cells % side).float()

    def code(position):
        angles = position[:, None] * frequencies[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([code(rows), code(columns)], dim=1)


@torch.no_grad()
def start_with_spatial_codes(model: Kosmos2ForConditionalGeneration, processor: Kosmos2Processor) -> None:
    """Initialise a model to be trained from scratch so that *where* reaches the text from step one.

    The real checkpoint starts from CLIP and learnt this from billions of tokens; a CPU budget
    cannot. Three structured starting points, all free to change in training:
    - location tokens get 2D sinusoidal codes of their 32x32 cell (neighbours start similar);
    - each vision patch carries a position code in the first part of every attention head's
      dimensions (content in the rest), and the resampler starts as "latent query i looks at
      patch i": its queries and keys compare position codes, its values pass everything on;
    - so image token i starts as patch i's content plus its position code.
    Needs an 8x8 patch grid (64 patches = 64 latent queries) and equal vision and text widths.
    """
    embeddings = model.get_input_embeddings().weight
    first = processor.tokenizer.convert_tokens_to_ids("<patch_index_0000>")
    codes = grid_codes(32, embeddings.shape[1])
    embeddings[first : first + NUM_PATCH_INDEX_TOKENS] = codes * embeddings.std() / codes.std()

    vision = model.vision_model.model.embeddings
    resampler = model.image_to_text_projection
    width, heads = resampler.x_attn.embed_dim, resampler.x_attn.num_heads
    side = vision.image_size // vision.patch_size
    if side * side != resampler.latent_query.shape[0] or vision.embed_dim != width:
        raise ValueError("spatial start needs 64 patches and equal vision and text widths")
    head_dim = width // heads
    code_dims = int(head_dim * CODE_SHARE)
    slots = torch.zeros(width, dtype=torch.bool)  # the position-code dimensions of every head
    for head in range(heads):
        slots[head * head_dim : head * head_dim + code_dims] = True
    patch_codes = grid_codes(side, code_dims, sharp=True)
    patch_codes = patch_codes / patch_codes.norm(dim=1, keepdim=True)
    spread = patch_codes.repeat(1, heads)  # the same code in every head's slot, (64, code_dims * heads)

    positions = vision.position_embedding.weight
    positions.zero_()
    positions[1:, slots] = spread * 4.0
    start_with_colour_features(vision.patch_embedding, content=torch.nonzero(~slots).flatten())
    for layer in model.vision_model.model.encoder.layers:  # residual blocks start as identities
        for projection in (layer.self_attn.out_proj, layer.mlp.fc2):
            projection.weight.zero_()
            projection.bias.zero_()

    # Sizes chosen so that query i's score for patch i is ~20 (a sharp softmax), the latent
    # queries' own keys stay ~10x weaker than the patches', and image tokens start at the norm of
    # token embeddings (~0.3, before the text model's embedding scale).
    identity = torch.eye(width)
    resampler.dense.weight.copy_(identity * 4.0)
    resampler.dense.bias.zero_()
    resampler.latent_query.zero_()
    resampler.latent_query[:, slots] = spread * 0.1
    attention = resampler.x_attn
    for projection in (attention.q_proj, attention.k_proj):
        projection.weight.copy_(torch.diag(slots.float()) * 34.0)
        projection.bias.zero_()
    for projection, scale in ((attention.v_proj, 1.0), (attention.out_proj, 0.5)):
        projection.weight.copy_(identity * scale)
        projection.bias.zero_()


@torch.no_grad()
def start_with_colour_features(patch_embedding: torch.nn.Conv2d, content: torch.Tensor, blocks: int = 4) -> None:
    """Patch features that start as mean colours of a `blocks` x `blocks` grid of sub-squares.

    The first 3 * blocks**2 `content` channels read one colour of one sub-square each (shape shows
    in how colour spreads over sub-squares); the remaining content channels keep their random start;
    all other channels (the position codes) read nothing.
    """
    weight = patch_embedding.weight  # (channels, 3, patch, patch)
    designed = content[: 3 * blocks * blocks]
    kept = torch.ones(weight.shape[0], dtype=torch.bool)
    kept[content] = False
    weight[kept] = 0.0
    step = weight.shape[-1] // blocks
    for number, channel in enumerate(designed.tolist()):
        colour, block = divmod(number, blocks * blocks)
        row, column = divmod(block, blocks)
        weight[channel] = 0.0
        weight[channel, colour, row * step : (row + 1) * step, column * step : (column + 1) * step] = 1.0 / step**2
