"""A training-only loss on the vision encoder's patches: what and where is the grounded object here?

Learning from the language loss alone, a small Kosmos-2 trained from nothing on a CPU budget never
learnt where things are (README, "Training"): the only signal reaching the vision encoder is a few
location tokens per caption, through a decoder that cannot yet use it. This loss gives every patch
a dense target instead: the words of the grounded phrase whose box holds the patch's centre (the
smallest such box) and that box's corners as cells of the 32x32 location grid. Every patch of an
object then carries the whole object's name and box, so the decoder only has to find one patch of
the named object and copy its box. The heads that read the patches are dropped after training:
the saved model is an ordinary Kosmos-2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import Kosmos2ForConditionalGeneration, Kosmos2Processor
from transformers.models.kosmos2.processing_kosmos2 import (
    clean_text_and_extract_entities_with_bboxes,
    coordinate_to_patch_index,
)

from kosmos_serve.training.records import IGNORE_INDEX, PATCHES_PER_SIDE, Example
from kosmos_serve.training.scratch import word_space

# The words' binary cross-entropy is summed over the vocabulary (one multi-label prediction per patch).
# Weighed up against the corners: at 10x less (the mean over the vocabulary, as before), patches
# learnt their object's colour but never its shape (experiments/grounding, "Shapes").
WORDS_WEIGHT = 2.5
WORD_CODE_SCALE = 3.0  # image tokens hold their words' embeddings at this scale (`PatchSupervision.word_loss`)
NormalisedBox = tuple[float, float, float, float]


def grounded_objects(examples: Sequence[Example], processor: Kosmos2Processor) -> dict[Path, list[tuple[NormalisedBox, list[int]]]]:
    """Per image, each grounded box with the token ids of the phrases that name it.

    Read from caption and referring examples (region examples name no phrase for their box).
    """
    named: dict[Path, dict[NormalisedBox, set[int]]] = {}
    for example in examples:
        if example.kind == "region":
            continue
        _, entities = clean_text_and_extract_entities_with_bboxes(example.prompt + example.target)
        for phrase, _, boxes in entities:
            ids = processor.tokenizer(phrase, add_special_tokens=False)["input_ids"]
            for box in boxes:
                named.setdefault(example.image_path, {}).setdefault(tuple(round(v, 4) for v in box), set()).update(ids)
    return {path: [(box, sorted(ids)) for box, ids in boxes.items()] for path, boxes in named.items()}


def patch_targets(
    objects: Sequence[tuple[NormalisedBox, list[int]]], side: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-hot phrase words (patches, vocab) and box corner cells (patches, 4) for a `side` x `side` grid.

    A patch takes the smallest box that holds its centre; patches in no box have no words and
    IGNORE_INDEX corners. Corners are the box's location tokens (upper-left and lower-right cells,
    as transformers' processor computes them) as (column, row, column, row) of the location grid.

    >>> words, corners = patch_targets([((0.0, 0.0, 0.5, 0.5), [7])], side=2, vocab_size=9)
    >>> words[:, 7].tolist(), corners[0].tolist(), corners[3].tolist()
    ([1.0, 0.0, 0.0, 0.0], [0, 0, 15, 15], [-100, -100, -100, -100])
    """
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    ys, xs = centres.repeat_interleave(side), centres.repeat(side)  # row-major patches
    words = torch.zeros(side * side, vocab_size)
    corners = torch.full((side * side, 4), IGNORE_INDEX, dtype=torch.long)
    smallest = torch.full((side * side,), float("inf"))
    for (x1, y1, x2, y2), ids in objects:
        area = (x2 - x1) * (y2 - y1)
        inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2) & (area < smallest)
        smallest[inside] = area
        words[inside] = 0.0
        words[inside.nonzero()[:, 0][:, None], torch.tensor(ids)[None, :]] = 1.0
        upper_left, lower_right = coordinate_to_patch_index((x1, y1, x2, y2), PATCHES_PER_SIDE)
        corners[inside] = torch.tensor([upper_left % PATCHES_PER_SIDE, upper_left // PATCHES_PER_SIDE,
                                        lower_right % PATCHES_PER_SIDE, lower_right // PATCHES_PER_SIDE])
    return words, corners


class PatchSupervision(nn.Module):
    """Linear heads on the vision encoder's patch features, and their loss (training only)."""

    def __init__(self, model: Kosmos2ForConditionalGeneration, processor: Kosmos2Processor, examples: Sequence[Example]):
        super().__init__()
        vision = model.config.vision_config
        self.side = vision.image_size // vision.patch_size
        self.vocab_size = len(processor.tokenizer)
        self.objects = grounded_objects(examples, processor)
        self._targets: dict[Path, tuple[torch.Tensor, torch.Tensor]] = {}
        self.words = nn.Linear(vision.hidden_size, self.vocab_size)
        with torch.no_grad():  # a patch's prior: each word unlikely, so the summed loss starts small
            self.words.bias.fill_(-math.log(self.vocab_size))
        self.corners = nn.Linear(vision.hidden_size, 4 * PATCHES_PER_SIDE)
        text = model.config.text_config
        rows, turn = word_space(text.embed_dim, text.embed_dim // text.attention_heads)
        self.register_buffer("word_rows", rows, persistent=False)
        self.register_buffer("word_turn", turn, persistent=False)

    def _targets_of(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's patch targets, memoised (the words kept sparse)."""
        if path not in self._targets:
            words, corners = patch_targets(self.objects.get(path, []), self.side, self.vocab_size)
            self._targets[path] = (words.to_sparse(), corners)
        return self._targets[path]

    def words_of(self, images: Sequence[Path]) -> torch.Tensor:
        """Stacked multi-hot word targets of each image's patches (batch, patches, vocab)."""
        return torch.stack([self._targets_of(path)[0].to_dense() for path in images])

    def corners_of(self, images: Sequence[Path]) -> torch.Tensor:
        """Stacked corner-cell targets of each image's patches (batch, patches, 4)."""
        return torch.stack([self._targets_of(path)[1] for path in images])

    def loss(self, model: Kosmos2ForConditionalGeneration, vision_output: torch.Tensor, images: Sequence[Path]) -> torch.Tensor:
        """Words (binary cross-entropy, summed over the vocabulary) and corner cells (cross-entropy) of every patch of `images`.

        `vision_output` is the vision encoder's last hidden state; its patches are read as the
        resampler reads them, after the post-layernorm.
        """
        features = model.vision_model.model.post_layernorm(vision_output[:, 1:])
        words, corners = self.words_of(images).to(features.device), self.corners_of(images).to(features.device)
        words_loss = nn.functional.binary_cross_entropy_with_logits(self.words(features), words, reduction="none").sum(-1).mean()
        if not (corners != IGNORE_INDEX).any():  # no patch of these images lies in a grounded box
            return WORDS_WEIGHT * words_loss
        corner_logits = self.corners(features).reshape(-1, PATCHES_PER_SIDE)
        corners_loss = nn.functional.cross_entropy(corner_logits, corners.reshape(-1), ignore_index=IGNORE_INDEX)
        return WORDS_WEIGHT * words_loss + corners_loss

    def word_loss(self, model: Kosmos2ForConditionalGeneration, image_embeds: torch.Tensor, images: Sequence[Path]) -> torch.Tensor:
        """How far each image token is from holding its patch's words, as the decoder's lookup head reads them.

        Image token i (one per patch) should hold WORD_CODE_SCALE x the sum of patch i's words' text
        embeddings, turned by `word_space`'s turn, in the word space: there the lookup head's keys
        turn it back and compare it with the phrase (`scratch.start_with_phrase_lookup`). Squared
        error summed over the word space, mean over tokens; the embeddings are the target, not trained by it.
        """
        words = self.words_of(images).to(image_embeds.device)
        embeddings = model.get_input_embeddings().weight.detach()
        target = WORD_CODE_SCALE * (words @ embeddings) @ self.word_rows.T
        read = image_embeds @ self.word_turn @ self.word_rows.T
        return (read - target).pow(2).sum(dim=-1).mean()


def box_attention_loss(
    attention: torch.Tensor, inputs: dict[str, torch.Tensor], corners: torch.Tensor, first_location_id: int
) -> torch.Tensor:
    """Mean -log of the attention one decoder head pays, while it writes a box, to that box's patches.

    `attention` is one head's probabilities (batch, query, key); `corners` the patch targets
    (batch, patches, 4). A box is two location tokens (upper-left, lower-right cell), each predicted
    from the position before it; the box's patches are those whose target is that box, and the
    image tokens start at the image position mask's first 1. Zero when the batch has no such box.
    """
    labels = inputs["labels"]
    cells = labels - first_location_id
    is_location = (cells >= 0) & (cells < PATCHES_PER_SIDE**2)
    image_starts = inputs["image_embeds_position_mask"].int().argmax(dim=1).tolist()
    losses = []
    for row, image_start in enumerate(image_starts):
        positions = is_location[row].nonzero().flatten().tolist()
        for upper_left, lower_right in zip(positions[0::2], positions[1::2]):
            first, last = cells[row, upper_left].item(), cells[row, lower_right].item()
            box = torch.tensor([first % PATCHES_PER_SIDE, first // PATCHES_PER_SIDE,
                                last % PATCHES_PER_SIDE, last // PATCHES_PER_SIDE])
            patches = (corners[row] == box).all(dim=1).nonzero().flatten() + image_start
            if patches.numel():
                paid = attention[row, [upper_left - 1, lower_right - 1]][:, patches].sum(dim=-1)
                losses.append(-(paid + 1e-6).log())
    return torch.cat(losses).mean() if losses else attention.sum() * 0.0
