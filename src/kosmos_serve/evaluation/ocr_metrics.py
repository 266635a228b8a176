"""OCR metrics: a page's character and word error rates, and its lines found by their boxes.

A line is `(text, box)`, the box `(x1, y1, x2, y2)` in the image's pixels. A line's text is compared with its runs of
whitespace made one space and its ends stripped; case and punctuation count.

- Page text: the lines in the order given (the model's as it listed them, the truth's as its file lists them: reading
  order is part of what is scored), joined by line breaks. CER = character edits (Levenshtein: insertions, deletions,
  substitutions) / characters of the true page text, line breaks included; WER = word edits / true words, words split
  at any whitespace.
- Lines: predicted and true lines matched one to one by box IoU >= 0.5, greedily: every pair at that IoU or above,
  the highest IoU first (ties in predicted, then true order), each line in at most one pair. (True lines that do not
  overlap each other leave no choice: a box has IoU above 0.5 with at most one of them.) Precision = matched /
  predicted, recall = matched / true, F1 their harmonic mean; the matched lines' CER is their texts' edits / the
  matched true lines' characters.
- Over many pages every figure is pooled: edits, characters, words and lines summed over the pages, then divided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from rapidfuzz.distance import Levenshtein

from kosmos_serve.grounding import iou

LINE_IOU_THRESHOLD = 0.5

Box = Sequence[float]
Line = tuple[str, Box]


def normalise(text: str) -> str:
    """A line's text as compared: runs of whitespace made one space, the ends stripped.

    >>> normalise("  open\\tthe   door ")
    'open the door'
    """
    return " ".join(text.split())


def page_text(texts: Sequence[str]) -> str:
    """A page's text: its lines, each normalised, in the order given, joined by line breaks.

    >>> page_text(["open  the door", " 12 items"])
    'open the door\\n12 items'
    """
    return "\n".join(normalise(text) for text in texts)


def character_edits(predicted: str, truth: str) -> int:
    """The fewest characters inserted, deleted or substituted to make `predicted` into `truth`.

    >>> character_edits("kitten", "sitting")
    3
    """
    return Levenshtein.distance(predicted, truth)


def word_edits(predicted: str, truth: str) -> int:
    """The fewest words inserted, deleted or substituted to make `predicted` into `truth` (words split at whitespace).

    >>> word_edits("the red\\ndoor is open", "the green door\\nis open now")
    2
    """
    return Levenshtein.distance(predicted.split(), truth.split())


def error_rate(edits: int, length: int) -> float | None:
    """Edits per unit of the truth's length (CER, WER); None when the truth is empty.

    >>> error_rate(3, 12), error_rate(0, 0)
    (0.25, None)
    """
    return edits / length if length else None


def match_lines(predicted: Sequence[Box], truth: Sequence[Box],
                threshold: float = LINE_IOU_THRESHOLD) -> list[tuple[int, int, float]]:
    """One-to-one matches `(predicted index, true index, IoU)` at IoU >= threshold, the highest IoU taken first.

    >>> match_lines([(0, 0, 10, 10), (1, 0, 10, 10), (0, 20, 10, 30), (50, 50, 60, 60)],
    ...             [(1, 0, 10, 10), (0, 21, 10, 30)])
    [(1, 0, 1.0), (2, 1, 0.9)]
    """
    pairs = [(-overlap, p, t, overlap) for p, box in enumerate(predicted) for t, true_box in enumerate(truth)
             if (overlap := iou(box, true_box)) >= threshold]
    used_predicted, used_true, matches = set(), set(), []
    for _, p, t, overlap in sorted(pairs):
        if p not in used_predicted and t not in used_true:
            used_predicted.add(p)
            used_true.add(t)
            matches.append((p, t, overlap))
    return matches


def f1(precision: float | None, recall: float | None) -> float | None:
    """The harmonic mean of precision and recall (0 when both are 0; None when either is undefined).

    >>> f1(0.5, 1.0), f1(0.0, 0.0), f1(None, 1.0)
    (0.6666666666666666, 0.0, None)
    """
    if precision is None or recall is None:
        return None
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


@dataclass(frozen=True)
class PageCounts:
    """What a page's figures are made of; counts of several pages add up (`sum(pages, PageCounts())`)."""

    characters: int = 0  # of the true page text, line breaks included
    character_edits: int = 0
    words: int = 0  # of the true page text
    word_edits: int = 0
    predicted_lines: int = 0
    true_lines: int = 0
    matched_lines: int = 0
    matched_characters: int = 0  # of the matched true lines' texts
    matched_character_edits: int = 0

    def __add__(self, other: PageCounts) -> PageCounts:
        return PageCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def cer(self) -> float | None:
        """Character error rate of the page text."""
        return error_rate(self.character_edits, self.characters)

    @property
    def wer(self) -> float | None:
        """Word error rate of the page text."""
        return error_rate(self.word_edits, self.words)

    @property
    def precision(self) -> float | None:
        """Predicted lines matched to a true line, of those predicted."""
        return self.matched_lines / self.predicted_lines if self.predicted_lines else None

    @property
    def recall(self) -> float | None:
        """True lines matched to a predicted line, of the true lines."""
        return self.matched_lines / self.true_lines if self.true_lines else None

    @property
    def f1(self) -> float | None:
        """The line detection's F1."""
        return f1(self.precision, self.recall)

    @property
    def matched_cer(self) -> float | None:
        """Character error rate of the matched lines' texts."""
        return error_rate(self.matched_character_edits, self.matched_characters)


def score_page(predicted: Sequence[Line], truth: Sequence[Line]) -> tuple[PageCounts, list[tuple[int, int, float]]]:
    """A page's counts and its line matches, from the lines read (in the model's order) and the true lines.

    >>> truth = [("open the door", (0, 0, 100, 20)), ("12 items", (0, 30, 60, 50))]
    >>> counts, matches = score_page([("open a door", (0, 0, 100, 20)), ("12 items", (0, 60, 60, 80))], truth)
    >>> counts.cer, counts.wer, counts.precision, counts.recall, counts.matched_cer, matches
    (0.13636363636363635, 0.2, 0.5, 0.5, 0.23076923076923078, [(0, 0, 1.0)])
    """
    predicted_text, true_text = page_text([t for t, _ in predicted]), page_text([t for t, _ in truth])
    matches = match_lines([box for _, box in predicted], [box for _, box in truth])
    matched = [(normalise(predicted[p][0]), normalise(truth[t][0])) for p, t, _ in matches]
    counts = PageCounts(
        characters=len(true_text), character_edits=character_edits(predicted_text, true_text),
        words=len(true_text.split()), word_edits=word_edits(predicted_text, true_text),
        predicted_lines=len(predicted), true_lines=len(truth), matched_lines=len(matches),
        matched_characters=sum(len(t) for _, t in matched),
        matched_character_edits=sum(character_edits(p, t) for p, t in matched),
    )
    return counts, matches
