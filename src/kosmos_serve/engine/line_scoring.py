"""Each line Kosmos-2.5 reads gets a score: how sure the model was of the line's box and of its text.

With `<ocr>` the model writes a line as `<bbox><x_..><y_..><x_..><y_..></bbox>` and then its text, in the same
decode steps that score it here (every token it writes has its probability recorded, as `TokenEvidence`):
- **box**: the geometric mean of the probability of `<bbox>` (that a line begins here, rather than the page ending)
  and, for each of the four coordinates, the probability the model gave to that coordinate or one within
  `NEAR_PIXELS` of it on the same axis (a box a pixel or two off is the same box: Kosmos-2's neighbouring patches);
- **text**: the geometric mean of the probabilities of the line's text tokens, up to the next box (the line break
  that ends the line included), i.e. exp(mean log-probability per token), so long and short lines compare;
- **score** = sqrt(box x text): the two weigh the same. A line with no text token is scored by its box alone.

Scores are in [0, 1], rounded to 4 decimals as Kosmos-2's boxes' scores are. A line the parser read that the tokens
do not show as such (never from the engine's own readings) is scored 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from kosmos_serve.engine.scoring import SCORE_DECIMALS, TokenEvidence
from kosmos_serve.grounding import GroundedText

NEAR_PIXELS = 2  # a coordinate's neighbourhood: the values within this many pixels of it, on its own axis
COORDINATE_TOKEN = re.compile(r"<([xy])_(\d+)>")


class ReadingVocabulary:
    """The token ids of Kosmos-2.5's box tags and coordinate tokens, read from its tokenizer; as the scheduler asks a
    vocabulary, every token a reading writes is read by scoring."""

    def __init__(self, tokenizer):
        self.box_start, self.box_end = tokenizer.convert_tokens_to_ids(["<bbox>", "</bbox>"])
        self.skipped = set(tokenizer.all_special_ids)  # what decoding with skip_special_tokens leaves out
        coordinates = {}
        for token, token_id in tokenizer.get_vocab().items():
            if match := COORDINATE_TOKEN.fullmatch(token):
                coordinates[token_id] = (match.group(1), int(match.group(2)))
        by_value = {value: token_id for token_id, value in coordinates.items()}
        # the location tokens whose neighbourhood's probability evidence records (Kosmos-2's patches, here coordinates)
        self.patch_of = coordinates
        self._neighbourhoods = {
            token_id: [by_value[(axis, near)] for near in range(value - NEAR_PIXELS, value + NEAR_PIXELS + 1)
                       if (axis, near) in by_value]
            for token_id, (axis, value) in coordinates.items()}
        self._mark = {self.box_start: "B", self.box_end: "E",
                      **{token_id: axis.upper() for token_id, (axis, _) in coordinates.items()}}

    def neighbourhood(self, token: int) -> list[int]:
        """The tokens of `token`'s coordinate and those within NEAR_PIXELS of it on the same axis."""
        return self._neighbourhoods[token]

    def phrase_open_after(self, was_open: bool, token: int) -> bool:
        """A reading has no phrases: all of it is read, as Kosmos-2's open phrases are."""
        return True

    def ends_in_phrase(self, ids: list[int]) -> bool:
        """Every token that follows a prompt is read."""
        return True

    def read_by_scoring(self, phrase_open: bool, token: int) -> bool:
        """Every token written is read."""
        return True

    def open_phrase_start(self, prompt: list[int]) -> int | None:
        """No prompt token is scored."""
        return None

    def line_tokens(self, ids: list[int], prompt_length: int) -> list[tuple[list[int], list[int]]]:
        """Per line the parser keeps (a box with x1 < x2 and y1 < y2), the positions of its `<bbox>` and coordinates,
        and of its text tokens up to the next box, in the order of `ocr.read_lines`.

        The written tokens are matched with the parser's box pattern token by token, so a line's text runs to the
        next whole box, as the parser splits it; special tokens (which decoding leaves out) belong to no line.
        """
        positions = [pos for pos in range(prompt_length, len(ids)) if ids[pos] not in self.skipped]
        marks = "".join(self._mark.get(ids[pos], "w") for pos in positions)
        boxes = list(re.finditer("BXYXYE", marks))
        lines = []
        for index, match in enumerate(boxes):
            box = [positions[i] for i in range(match.start(), match.end() - 1)]
            x1, y1, x2, y2 = (self.patch_of[ids[pos]][1] for pos in box[1:])
            if x1 >= x2 or y1 >= y2:
                continue
            text_end = boxes[index + 1].start() if index + 1 < len(boxes) else len(positions)
            lines.append((box, [positions[i] for i in range(match.end(), text_end)]))
        return lines


def score_lines(output: GroundedText, ids: list[int], prompt_length: int, evidence: TokenEvidence,
                vocabulary: ReadingVocabulary) -> GroundedText:
    """`output` (parsed from `ids`) with every line scored; a reading without lines (markdown) as it is."""
    if not output.lines:
        return output
    located = vocabulary.line_tokens(ids, prompt_length)
    if len(located) != len(output.lines):
        return replace(output, lines=tuple(replace(line, score=0.0) for line in output.lines))
    return replace(output, lines=tuple(replace(line, score=line_score(box, text, evidence))
                                       for line, (box, text) in zip(output.lines, located)))


def line_score(box: list[int], text: list[int], evidence: TokenEvidence) -> float:
    """sqrt(box x text) for a line whose `<bbox>` and coordinates are at `box` and text tokens at `text`."""
    if any(pos not in evidence.logprobs for pos in box + text):
        return 0.0
    box_logs = [evidence.logprobs[box[0]], *(math.log(max(evidence.corner_mass[pos], 1e-300)) for pos in box[1:])]
    box_confidence = math.exp(sum(box_logs) / len(box_logs))
    score = box_confidence
    if text:
        score = math.sqrt(box_confidence * math.exp(sum(evidence.logprobs[pos] for pos in text) / len(text)))
    return round(min(score, 1.0), SCORE_DECIMALS)  # a neighbourhood's mass can pass 1 by float rounding
