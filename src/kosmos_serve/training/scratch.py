"""A fresh Kosmos-2 to train from scratch on a CPU budget, started so that grounding can be learnt.

The real checkpoint starts from CLIP and learnt where things are from billions of tokens. A model
trained here from nothing in under an hour cannot, unless its start already routes position and
colour from the image to the text: that start is `start_with_spatial_codes`.
"""

from __future__ import annotations

import torch
from transformers import Kosmos2ForConditionalGeneration, Kosmos2Processor

from kosmos_serve.training.tiny_model import (
    NUM_PATCH_INDEX_TOKENS,
    build_processor,
    build_tokenizer,
    tiny_config,
    training_corpus,
)

# The size of a model trained from scratch on synthetic scenes (`--model scratch`): an 8x8 patch grid,
# so the resampler's 64 latent queries can start one per patch (see `start_with_spatial_codes`).
SCRATCH_SIZE = {"text_width": 128, "text_layers": 3, "vision_width": 128, "vision_layers": 3, "patch_size": 28}
CODE_SHARE = 0.5  # of each attention head's dimensions, the share that starts as a position code
# The decoder heads that start as the phrase lookup (`start_with_phrase_lookup`): head 0 of layer 0
# gathers the phrase, head 0 of LOOKUP_LAYER compares it with the image tokens.
LOOKUP_LAYER = 1
PHRASE_OFFSETS = (2, 3)  # "<phrase> a red circle</phrase><object>": the words 2 and 3 tokens before <object>
GATHER_SHARPNESS = 1.0
LOOKUP_SHARPNESS = 3.0


def build_scratch_model(seed: int = 0) -> tuple[Kosmos2ForConditionalGeneration, Kosmos2Processor]:
    """A fresh small Kosmos-2 with the checkpoint's initialisation scale, ready to train."""
    processor = build_processor(build_tokenizer(training_corpus()))
    torch.manual_seed(seed)
    config = tiny_config(len(processor.tokenizer), init_std=0.02, **SCRATCH_SIZE)
    model = Kosmos2ForConditionalGeneration(config)
    start_with_spatial_codes(model, processor)
    start_with_phrase_lookup(model)
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


def patches_of_cells(cells: torch.Tensor, side: int) -> torch.Tensor:
    """The patch (of a `side` x `side` grid, row-major) that holds each cell of the 32x32 location grid.

    >>> patches_of_cells(torch.tensor([0, 3, 4, 31, 128, 1023]), 8).tolist()
    [0, 0, 1, 7, 8, 63]
    """
    rows, columns = cells // 32, cells % 32
    return (rows * side // 32) * side + columns * side // 32


@torch.no_grad()
def start_with_spatial_codes(model: Kosmos2ForConditionalGeneration, processor: Kosmos2Processor) -> None:
    """Initialise a model to be trained from scratch so that *where* reaches the text from step one.

    The real checkpoint starts from CLIP and learnt this from billions of tokens; a CPU budget
    cannot. Three structured starting points, all free to change in training:
    - location tokens start with their patch's position code (as image tokens carry it) and a
      smooth code of their own cell (neighbours start similar);
    - each vision patch carries a position code in the first part of every attention head's
      dimensions (content in the rest), and the resampler starts as "latent query i looks at
      patch i": its queries and keys compare position codes, its values pass everything on;
    - so image token i starts as patch i's content plus its position code.
    Needs an 8x8 patch grid (64 patches = 64 latent queries) and equal vision and text widths.
    """
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

    # A location token (a cell of the 32x32 grid) starts with its patch's code in the same slots as
    # the image tokens, and a smooth code of its own cell in the other dimensions: reading a box
    # off an attended image token is then a copy, not a mapping to learn.
    embeddings = model.get_input_embeddings().weight
    first = processor.tokenizer.convert_tokens_to_ids("<patch_index_0000>")
    patch_of_cell = patches_of_cells(torch.arange(NUM_PATCH_INDEX_TOKENS), side)
    fine = grid_codes(32, int((~slots).sum()))
    location = torch.zeros(NUM_PATCH_INDEX_TOKENS, width)
    location[:, slots] = spread[patch_of_cell]
    location[:, ~slots] = fine / fine.norm(dim=1, keepdim=True) * spread.norm(dim=1).mean()
    embeddings[first : first + NUM_PATCH_INDEX_TOKENS] = location * embeddings.norm(dim=1).mean() / location.norm(dim=1).mean()

    positions = vision.position_embedding.weight
    positions.zero_()
    positions[1:, slots] = spread * 4.0
    start_with_colour_features(vision.patch_embedding, content=torch.nonzero(~slots).flatten())
    for layer in model.vision_model.model.encoder.layers:  # residual blocks start as identities
        for projection in (layer.self_attn.out_proj, layer.mlp.fc2):
            projection.weight.zero_()
            projection.bias.zero_()

    # Sizes chosen so that query i's score for patch i is ~20 (a sharp softmax), the latent
    # queries' own keys stay ~10x weaker than the patches', and image tokens start at norm ~2
    # (~28 after the text model's embedding scale), above the sinusoidal text positions' ~10:
    # at the norm of token embeddings the decoder never learnt to look at them.
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


def word_space(width: int, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed frame the lookups compare words in, and the turn image tokens hold their words with.

    Rows: first `dims` random orthonormal rows (the phrase lookup's), then the text width's slowest
    sinusoidal sines (the name lookup's: positions up to a few hundred are ~0 there, so a word's own
    embedding is not drowned by its position), the two sets orthogonal. The orthogonal turn keeps a
    text token from matching itself. Seeded, so the start and the training loss agree.
    """
    generator = torch.Generator().manual_seed(2023)
    half = width // 2
    quiet = torch.arange(half - width // 8, half)  # sines of the slowest frequencies
    random_rows = torch.randn(width, dims, generator=generator)
    random_rows[quiet] = 0.0
    rows = torch.cat([torch.linalg.qr(random_rows)[0].T, torch.eye(width)[quiet]])
    turn = torch.linalg.qr(torch.randn(width, width, generator=generator))[0]
    return rows, turn


@torch.no_grad()
def start_with_phrase_lookup(model: Kosmos2ForConditionalGeneration) -> None:
    """Start two decoder heads as "find the image tokens of the object the phrase names".

    Learning this lookup from the language loss alone stalled at picking *some* object (see
    experiments/grounding). The start, free to change in training:
    - layer 0, head 0 (the gather): its queries are the sinusoidal positions turned back by
      PHRASE_OFFSETS tokens, its keys the positions as they are, so the position that writes a box
      (<object>) looks at the phrase's words; its values and output pass their `word_space` part on;
    - LOOKUP_LAYER, head 0 (the lookup): queries read that gathered phrase in the word space, keys
      read an image token's words turned back (patch supervision teaches image tokens to hold their
      words' embeddings turned, `PatchSupervision.word_loss`), so the phrase's words select the
      image tokens of the object they name.
    - layer 0, head 1 (the name lookup): a word looks up the image tokens that hold it and passes
      on their words, so that "red" is followed by the red object's shape.
    The box-attention loss (`box_attention_loss`) then keeps the lookup on the named object.
    """
    layers = model.text_model.model.layers
    width = model.config.text_config.embed_dim
    head_dim = width // model.config.text_config.attention_heads
    both_rows, turn = word_space(width, head_dim)
    rows, name_rows = both_rows[:head_dim], both_rows[head_dim:]
    half = width // 2  # the sinusoidal positions: sines in the first half, cosines in the second

    layer_zero = layers[0].self_attn  # head 0: the gather; head 1: the name lookup
    for projection in (layer_zero.q_proj, layer_zero.k_proj, layer_zero.v_proj):
        projection.weight[:head_dim] = 0.0
        projection.bias[:head_dim] = 0.0
    for pair in range(head_dim // 2):
        frequency = pair % 8  # the 8 highest frequencies, repeated: sharp over a few tokens
        omega = 10000 ** (-frequency / (half - 1))
        sine, cosine = 2 * pair, 2 * pair + 1
        layer_zero.k_proj.weight[sine, frequency] = GATHER_SHARPNESS
        layer_zero.k_proj.weight[cosine, half + frequency] = GATHER_SHARPNESS
        for back in PHRASE_OFFSETS:  # rotate the query's phase back by `back` positions
            c, s = torch.cos(torch.tensor(omega * back)), torch.sin(torch.tensor(omega * back))
            layer_zero.q_proj.weight[sine, frequency] += GATHER_SHARPNESS * c
            layer_zero.q_proj.weight[sine, half + frequency] -= GATHER_SHARPNESS * s
            layer_zero.q_proj.weight[cosine, half + frequency] += GATHER_SHARPNESS * c
            layer_zero.q_proj.weight[cosine, frequency] += GATHER_SHARPNESS * s
    layer_zero.v_proj.weight[:head_dim] = rows
    layer_zero.out_proj.weight[:, :head_dim] = rows.T

    name = slice(head_dim, head_dim + len(name_rows))  # head 1 of layer 0
    for projection in (layer_zero.q_proj, layer_zero.k_proj, layer_zero.v_proj):
        projection.weight[head_dim : 2 * head_dim] = 0.0
    layer_zero.q_proj.weight[name] = LOOKUP_SHARPNESS * name_rows
    layer_zero.k_proj.weight[name] = LOOKUP_SHARPNESS * name_rows @ turn.T
    layer_zero.v_proj.weight[name] = name_rows @ turn.T
    layer_zero.out_proj.weight[:, name] = name_rows.T
    for projection in (layer_zero.q_proj, layer_zero.k_proj, layer_zero.v_proj):
        projection.bias[name] = 0.0

    lookup = layers[LOOKUP_LAYER].self_attn
    lookup.q_proj.weight[:head_dim] = LOOKUP_SHARPNESS * rows
    lookup.k_proj.weight[:head_dim] = LOOKUP_SHARPNESS * rows @ turn.T
    lookup.q_proj.bias[:head_dim] = 0.0
    lookup.k_proj.bias[:head_dim] = 0.0
