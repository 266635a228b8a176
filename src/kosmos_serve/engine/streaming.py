"""A streamed request's text, read off the engine's thread from the token ids the engine hands over.

The engine thread only hands each new token id of a streamed request to its consumer (a `StreamPiece`
a step); the consumer (the batcher's relay, on the event loop) turns them into text with a `TextStream`,
as vLLM's engine core leaves detokenising to its front end. A `TextStream` decodes a small window of
ids per token (the ids since the last decoded text, after the ones before them), not the whole text so
far; a prompt's pieces join into the decode of its new tokens, exactly. It settles text as transformers'
`TextStreamer` did on the engine thread: a word once the next one begins (up to the last space or line
break), at once after a CJK ideograph, the rest when the prompt ends.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

INCOMPLETE = "\ufffd"  # what decoding gives for a character whose bytes are split over tokens


@dataclass(frozen=True)
class StreamPiece:
    """What the engine thread hands a streamed request's consumer after a step.

    `tokens`: the new token ids of the request's current prompt; `prompt_done`: that prompt ended (its
    text is settled, the next prompt's tokens start afresh); `text`: text the engine settled itself
    (beam search's answers, which come whole).
    """

    tokens: tuple[int, ...] = ()
    prompt_done: bool = False
    text: str = ""


class TextStream:
    """Token ids in, settled text out, for one streamed request: each prompt's pieces join into the decode of its
    new tokens (`skip_special_tokens`), whatever they were handed in."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._decoded = 0  # ids[:decoded]: their text is in `_held` or out; they are kept as context for the rest
        self._held = ""  # decoded, not settled yet

    def read(self, piece: StreamPiece) -> str:
        """The text `piece` settles (possibly none)."""
        if piece.tokens:
            self._held += self._decode_new(piece.tokens)
        if piece.prompt_done:
            return piece.text + self._end_prompt()
        cut = _settled_length(self._held)
        settled, self._held = self._held[:cut], self._held[cut:]
        return piece.text + settled

    def _end_prompt(self) -> str:
        """The rest of the prompt's text, whatever it ends with; the next tokens start afresh."""
        rest = self._held + self._decode(self._ids)[len(self._decode(self._ids[: self._decoded])) :]
        self._ids, self._decoded, self._held = [], 0, ""
        return rest

    def _decode_new(self, tokens: tuple[int, ...]) -> str:
        """The text `tokens` add after the ids before them (none yet for a character split over tokens)."""
        self._ids.extend(tokens)
        before = self._decode(self._ids[: self._decoded])
        now = self._decode(self._ids)
        if now.endswith(INCOMPLETE) or len(now) <= len(before):
            return ""  # a split character, or ids that decode to nothing (yet): wait for more
        self._ids, self._decoded = self._ids[self._decoded :], len(self._ids) - self._decoded
        return now[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


def _settled_length(text: str) -> int:
    """How much of `text` is settled: up to its last space or line break; all of it after a CJK ideograph (text
    written without spaces), as `TextStreamer` settles it."""
    if text and unicodedata.name(text[-1], "").startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH")):
        return len(text)
    return max(text.rfind(" "), text.rfind("\n")) + 1
