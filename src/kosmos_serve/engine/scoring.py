"""Each box's score: how sure the model is that the box shows its phrase, from its own probabilities.

A box's score is `presence x localisation`, both in [0, 1]:
- **presence**: how much more likely the model finds the phrase with this image than with a blank one.
  With `log p(phrase | image)` the log-probability of the phrase's tokens and its closing `</phrase>`
  in the row's own context, and `log p(phrase | blank)` the same after `<grounding><phrase>` on a
  blank (mean-grey) image, presence = sigmoid(log p(phrase | image) - log p(phrase | blank)): the
  chance that the phrase is read off this image rather than expected of any image, with even odds.
  A phrase in the prompt (detection, phrase grounding) is scored from the prompt's own forward pass;
  one the model writes (a caption's), from the decode steps that wrote it. The blank image's value
  depends on the phrase alone, so it is computed once per phrase and kept (`PhrasePriors`), read after
  the blank image's `<grounding><phrase>`, which is prefilled once.
- **localisation**: Kosmos-2 writes a box as two location tokens, the patches (of a 32 x 32 grid)
  holding its top-left and bottom-right corners. For each corner, the probability the model gave to
  that patch or one of its 8 neighbours (a box one patch off is still the same box); localisation is
  the geometric mean of the two.

A box without a phrase (a bare `<object>`) has presence 1. A box given in the prompt (region
questions, referring generation) is the caller's, not the model's: it keeps score 1.
Scores are rounded to 4 decimals. Batched, a row's logits differ from its solo run's in float32's last
bits (attention sums over rows left-padded to a common width); rounded, about one score in 800 flips its
4th decimal. Boxes and tokens are the same.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from kosmos_serve.grounding import GroundedText

SCORE_DECIMALS = 4
PRIOR_CACHE_SIZE = 4096  # phrases whose blank-image log-probability is kept
NEIGHBOURHOOD = [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


@dataclass
class TokenEvidence:
    """What the model said of a row's tokens, by their position in the row's ids: of those scoring reads (a
    prompt's scored tail; a generated phrase's words and `</phrase>`, and location tokens), at least.

    `logprobs[pos]`: log p(ids[pos] | ids[:pos], image); `corner_mass[pos]`: for a location token, the
    probability of its patch and the patches around it at that step.
    """

    logprobs: dict[int, float] = field(default_factory=dict)
    corner_mass: dict[int, float] = field(default_factory=dict)


class GroundingVocabulary:
    """The token ids of Kosmos-2's grounding tags and location tokens, read from its tokenizer."""

    def __init__(self, tokenizer, patches: int = 1024):
        ids = tokenizer.convert_tokens_to_ids
        self.phrase_start, self.phrase_end = ids("<phrase>"), ids("</phrase>")
        self.object_start, self.object_end = ids("<object>"), ids("</object>")
        self.delimiter = ids("</delimiter_of_multi_objects/>")
        self.image_end = ids("</image>")
        self.grid = math.isqrt(patches)
        self.patch_ids = [ids(f"<patch_index_{index:04d}>") for index in range(patches)]
        self.patch_of = {token: index for index, token in enumerate(self.patch_ids)}
        self._neighbourhoods = {token: self._neighbours(token) for token in self.patch_ids}
        self.skipped = set(tokenizer.all_special_ids)  # what decoding with skip_special_tokens leaves out
        self._tag = {self.phrase_start: "P", self.phrase_end: "p", self.object_start: "O", self.object_end: "o",
                     self.delimiter: "D", **{token: "L" for token in self.patch_ids}}
        self._angle = {token for token in range(len(tokenizer)) if "<" in tokenizer.convert_ids_to_tokens(token)}

    def neighbourhood(self, token: int) -> list[int]:
        """The location tokens of `token`'s patch and its neighbours on the grid."""
        return self._neighbourhoods[token]

    def _neighbours(self, token: int) -> list[int]:
        x, y = self.patch_of[token] % self.grid, self.patch_of[token] // self.grid
        return [self.patch_ids[(y + dy) * self.grid + x + dx] for dx, dy in NEIGHBOURHOOD
                if 0 <= x + dx < self.grid and 0 <= y + dy < self.grid]

    def phrase_open_after(self, was_open: bool, token: int) -> bool:
        """Whether a phrase is open (a `<phrase>` not closed yet) after `token`, given whether one was before it."""
        return token == self.phrase_start or (was_open and token != self.phrase_end)

    def ends_in_phrase(self, ids: list[int]) -> bool:
        """Whether `ids` end inside a phrase: the tokens that follow are its words, or its `</phrase>`."""
        starts = [pos for pos, token in enumerate(ids) if token == self.phrase_start]
        return bool(starts) and self.phrase_end not in ids[starts[-1] :]

    def read_by_scoring(self, phrase_open: bool, token: int) -> bool:
        """Whether scoring reads the probability of `token`, written with a phrase open or not: a phrase's word or
        `</phrase>` (presence), or a location token (localisation)."""
        return phrase_open or token in self.patch_of

    def open_phrase_start(self, prompt: list[int]) -> int | None:
        """Where the prompt's last phrase begins when it still awaits its box (`...<phrase> X</phrase>`), else None."""
        starts = [pos for pos, token in enumerate(prompt) if token == self.phrase_start]
        if not starts or self.object_start in prompt[starts[-1]:]:
            return None
        return starts[-1] + 1

    def entity_tokens(self, ids: list[int]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Per entity, as transformers lists them: (positions of its phrase and `</phrase>`, its corner positions).

        The tokens after `</image>` are matched with transformers' own pattern, token by token
        (`[^<]+` is a run of word tokens), so the entities come in the order and grouping of
        `clean_text_and_extract_entities_with_bboxes`; a bare `<object>` gives one entity per box.
        """
        begin = ids.index(self.image_end) + 1 if self.image_end in ids else 0
        marks, positions = [], []
        for pos in range(begin, len(ids)):
            token = ids[pos]
            if token in self._tag:
                marks.append(self._tag[token])
            elif token in self.skipped:
                continue
            else:
                marks.append("<" if token in self._angle else "w")
            positions.append(pos)
        entities = []
        for match in re.finditer(r"(?:P(w+)p)?O((?:LLD)*LL)o", "".join(marks)):
            corners = [(positions[i], positions[i + 1]) for i in range(match.start(2), match.end(2), 3)]
            if match.group(1):
                phrase = [positions[i] for i in range(match.start(1), match.end(1) + 1)]  # + </phrase>
                entities.append((phrase, corners))
            else:
                entities.extend(([], [pair]) for pair in corners)
        return entities


class PhrasePriors:
    """log p(phrase tokens, `</phrase>` | blank image, `<grounding><phrase>`), computed once per phrase."""

    def __init__(self, compute: Callable[[list[tuple[int, ...]]], list[float]]):
        self._compute = compute  # phrases' token ids -> their log-probabilities, in one pass
        self._cache: OrderedDict[tuple[int, ...], float] = OrderedDict()

    def missing(self, phrases: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The phrases not known yet, each once."""
        return list(dict.fromkeys(phrase for phrase in phrases if phrase not in self._cache))

    def store(self, phrases: list[tuple[int, ...]], log_probs: list[float]) -> None:
        """Keep priors read elsewhere (a detection's new phrases, read in its prompts' own forward pass)."""
        self._cache.update(zip(phrases, log_probs))
        while len(self._cache) > PRIOR_CACHE_SIZE:
            self._cache.popitem(last=False)

    def __call__(self, phrase: tuple[int, ...]) -> float:
        if phrase not in self._cache:
            self.store([phrase], self._compute([phrase]))
        self._cache.move_to_end(phrase)
        return self._cache[phrase]


def evidence_from(log_probs: torch.Tensor, tokens: list[int], first_position: int, vocabulary: GroundingVocabulary,
                  evidence: TokenEvidence) -> None:
    """Add to `evidence` the tokens at `first_position`.. given each one's log-softmax row (tokens, vocab)."""
    for offset, (row, token) in enumerate(zip(log_probs, tokens)):
        pos = first_position + offset
        evidence.logprobs[pos] = float(row[token])
        if token in vocabulary.patch_of:
            evidence.corner_mass[pos] = float(row[vocabulary.neighbourhood(token)].exp().sum())


def evidence_from_choices(log_probs: torch.Tensor, tokens: list[int], positions: list[int],
                          evidences: list[TokenEvidence], vocabulary: GroundingVocabulary) -> None:
    """Add each row's chosen token, at its position, to its evidence, given the rows' log-softmax (rows, vocab).

    A few reads for all the rows together; each value is the one `evidence_from` reads for its row alone (a
    copy, or a sum over the same neighbourhood in the same order).
    """
    chosen = log_probs.gather(1, torch.tensor(tokens, device=log_probs.device)[:, None])[:, 0].tolist()
    for evidence, pos, value in zip(evidences, positions, chosen):
        evidence.logprobs[pos] = value
    by_size: dict[int, list[int]] = {}  # rows whose token is a location, by its neighbourhood's size (edges: fewer)
    for row, token in enumerate(tokens):
        if token in vocabulary.patch_of:
            by_size.setdefault(len(vocabulary.neighbourhood(token)), []).append(row)
    for rows in by_size.values():
        around = torch.tensor([vocabulary.neighbourhood(tokens[row]) for row in rows], device=log_probs.device)
        masses = log_probs[rows].gather(1, around).exp().sum(dim=-1).tolist()
        for row, mass in zip(rows, masses):
            evidences[row].corner_mass[positions[row]] = mass


def score_output(output: GroundedText, ids: list[int], prompt_length: int, evidence: TokenEvidence,
                 vocabulary: GroundingVocabulary, priors: PhrasePriors) -> GroundedText:
    """`output` (parsed from `ids`) with every entity's boxes scored."""
    located = vocabulary.entity_tokens(ids)
    if len(located) != len(output.entities) or any(len(c) != len(e.boxes) for (_, c), e in zip(located, output.entities)):
        located = [([], [None] * len(entity.boxes)) for entity in output.entities]  # unmatched: scored 0 below
    entities = []
    for entity, (phrase, corners) in zip(output.entities, located):
        presence = _presence(phrase, ids, evidence, priors)
        scores = tuple(_box_score(pair, prompt_length, presence, evidence) for pair in corners)
        entities.append(replace(entity, scores=scores))
    return replace(output, entities=tuple(entities))


def _presence(phrase: list[int], ids: list[int], evidence: TokenEvidence, priors: PhrasePriors) -> float:
    """sigmoid(log p(phrase | image) - log p(phrase | blank)); 1 for no phrase or one the model did not read."""
    if not phrase or any(pos not in evidence.logprobs for pos in phrase):
        return 1.0
    with_image = sum(evidence.logprobs[pos] for pos in phrase)
    blank = priors(tuple(ids[pos] for pos in phrase[:-1]))
    return 1.0 / (1.0 + math.exp(min(blank - with_image, 700.0)))


def _box_score(corners: tuple[int, int] | None, prompt_length: int, presence: float, evidence: TokenEvidence) -> float:
    if corners is None:
        return 0.0
    if corners[0] < prompt_length:
        return 1.0  # a box the caller gave
    masses = [evidence.corner_mass.get(pos, 0.0) for pos in corners]
    return round(presence * math.sqrt(masses[0] * masses[1]), SCORE_DECIMALS)
