"""Every running row's next token in one pass over the batch's logits, each as `generate` picks it for the row alone.

A greedy row whose only logits processor is transformers' no-repeat-n-gram ban (the service's default) or
none is chosen by one argmax over the whole batch, after its banned tokens are set to -inf in place (and
put back right after, for the scoring evidence read from the same logits). The ban is kept per row as the
row grows (`NgramBans`), not recounted from the whole row at every step as the processor does; it bans
the same tokens. Any other row (sampling with its own generator, or other processors) runs transformers'
own processors alone, as `generate` would. Argmax compares without arithmetic, so a row's token does not
depend on the rows beside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor


class NgramBans:
    """transformers' `NoRepeatNGramLogitsProcessor` for one growing row: the tokens that would repeat an n-gram.

    The n-grams are indexed once each, as the row grows, instead of recounted from the whole row at every step.
    """

    def __init__(self, size: int):
        self.size = size
        self._next: dict[tuple[int, ...], list[int]] = {}  # an n-gram's first n-1 ids -> the ids that followed
        self._next_end = size  # the n-gram ending there is the next to index

    def __call__(self, ids: list[int]) -> list[int]:
        """The tokens banned after `ids` (the row so far, which only grows between calls)."""
        for end in range(self._next_end, len(ids) + 1):
            self._next.setdefault(tuple(ids[end - self.size : end - 1]), []).append(ids[end - 1])
        self._next_end = max(self._next_end, len(ids) + 1)
        if len(ids) + 1 < self.size:
            return []
        return self._next.get(tuple(ids[len(ids) - self.size + 1 :]), [])


@dataclass(eq=False)
class RowChooser:
    """How one row picks its next token: batched (greedy, at most an n-gram ban) or alone (anything else)."""

    processors: LogitsProcessorList  # transformers' own, as `generate` builds them for the row's parameters
    generator: torch.Generator | None = None  # set when sampling
    batched: bool = field(init=False)  # chosen by the batch's argmax
    bans: NgramBans | None = field(init=False)  # a batched row's n-gram ban, if it has one

    def __post_init__(self):
        bans = [p for p in self.processors if isinstance(p, NoRepeatNGramLogitsProcessor)]
        self.batched = self.generator is None and len(bans) == len(self.processors)
        self.bans = NgramBans(bans[0].ngram_size) if self.batched and bans else None

    def choose_alone(self, ids: list[int], logits: torch.Tensor) -> int:
        """The row's token from its own logits (vocab,), through its processors: sampled with its generator, or
        the argmax."""
        scores = self.processors(torch.tensor([ids], device=logits.device), logits[None])
        if self.generator is not None:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            return int(torch.multinomial(probs, num_samples=1, generator=self.generator)[0, 0])
        return int(torch.argmax(scores, dim=-1)[0])


@torch.inference_mode()  # the logits are the model's inference tensors, changed in place for a moment
def choose_tokens(logits: torch.Tensor, choosers: Sequence[RowChooser], ids: Sequence[list[int]]) -> list[int]:
    """Each row's next token from the batch's `logits` (rows, vocab), given each row's ids so far; `logits` is left
    as it came."""
    banned = [(row, token) for row, chooser in enumerate(choosers) if chooser.bans is not None
              for token in chooser.bans(ids[row])]
    greedy: list[int] = []
    if any(chooser.batched for chooser in choosers):
        with _set_to_minus_infinity(logits, banned):
            greedy = torch.argmax(logits, dim=-1).tolist()  # one argmax for every row
    return [greedy[row] if chooser.batched else chooser.choose_alone(ids[row], logits[row])
            for row, chooser in enumerate(choosers)]


@contextlib.contextmanager
def _set_to_minus_infinity(logits: torch.Tensor, cells: list[tuple[int, int]]) -> Iterator[None]:
    """`logits` with `cells` (row, token) at -inf inside the block, their values put back after it."""
    if not cells:
        yield
        return
    rows, tokens = (torch.tensor(column, device=logits.device) for column in zip(*cells))
    kept = logits[rows, tokens]
    logits[rows, tokens] = -float("inf")
    try:
        yield
    finally:
        logits[rows, tokens] = kept
