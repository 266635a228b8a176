"""A page read the same way every time by a random tiny Kosmos-2.5, which on its own writes no lines: only the
scheduler's choice of tokens is replaced, so prefill, decode steps, scoring and parsing are the production code's."""

from __future__ import annotations

from kosmos_serve.engine import scheduler as scheduler_module
from kosmos_serve.tasks import PromptSpec

READING = "<bbox><x_12><y_20><x_240><y_44></bbox>RECEIPT 0008\n<bbox><x_12><y_60><x_300><y_80></bbox>Total 50,000\n"


def force_reading(engine, monkeypatch, reading: str = READING) -> None:
    """Make `engine` write `reading`, then `</s>`, after its `<ocr>` prompt (until `monkeypatch` undoes it)."""
    tokenizer = engine.processor.tokenizer
    tokens = tokenizer(reading, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_length = len(engine.family.tokenise(engine.processor, PromptSpec("<ocr>"))[0])
    monkeypatch.setattr(scheduler_module, "choose_tokens",
                        lambda logits, choosers, ids: [tokens[len(row) - prompt_length] for row in ids])
