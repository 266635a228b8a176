"""A streamed request's text, read off the engine's thread from the token ids the engine hands over.

The engine thread only hands each new token id of a streamed request to its consumer (a `StreamPiece`
a step); the consumer (the batcher's relay, on the event loop) turns them into text with a `TextStream`,
as vLLM's engine core leaves detokenising to its front end. A `TextStream` decodes a small window of
ids per token (the ids since the last settled text, after the ones before them), not the whole text so
far, and holds back only a character whose bytes have not all come: a prompt's pieces join into the
decode of its new tokens, exactly.
"""

from __future__ import annotations

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
        self._settled = 0  # ids[:settled]: their text is out; decoding starts at ids[0], which only gives context

    def read(self, piece: StreamPiece) -> str:
        """The text `piece` settles (possibly none)."""
        text = piece.text + self._read_tokens(piece.tokens) if piece.tokens else piece.text
        if piece.prompt_done:
            text += self._flush()
        return text

    def _read_tokens(self, tokens: tuple[int, ...]) -> str:
        self._ids.extend(tokens)
        before = self._decode(self._ids[: self._settled])
        now = self._decode(self._ids)
        if now.endswith(INCOMPLETE) or len(now) <= len(before):
            return ""  # a split character, or ids that decode to nothing (yet): wait for more
        self._ids, self._settled = self._ids[self._settled :], len(self._ids) - self._settled
        return now[len(before) :]

    def _flush(self) -> str:
        """The rest of the prompt's text, whatever it ends with; the next tokens start a new prompt."""
        text = self._decode(self._ids)[len(self._decode(self._ids[: self._settled])) :]
        self._ids, self._settled = [], 0
        return text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
