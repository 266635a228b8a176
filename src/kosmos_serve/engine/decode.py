"""One prefill or one decode step over Kosmos-2's text decoder, for rows that join and leave a running batch.

The rows of a `RunningBatch` share one DynamicCache, left-padded to a common width, and an attention
mask that says which cache columns are real. Positions come from the mask (`cumsum * mask +
padding_idx`, prefill's own formula, as `loading.PaddingAwareKosmos2TextForCausalLM` supplies them
to `generate`), so a row sees exactly the positions it sees alone, whatever joined before or after it.
Pad columns hold zeros and are masked: a masked key gets softmax weight exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class RunningBatch:
    """The KV cache and attention mask of rows decoding together (row order = the scheduler's)."""

    cache: DynamicCache
    mask: torch.Tensor  # (rows, width) long: 1 where the cache column holds a real token

    @property
    def size(self) -> int:
        return self.mask.shape[0]


def positions_from_mask(mask: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Prefill's positions for left-padded rows: real tokens count from padding_idx + 1, pads sit at padding_idx."""
    return mask.cumsum(dim=-1) * mask + padding_idx


@torch.inference_mode()
def prefill(model, input_ids: list[list[int]], image_masks: list[list[int]], image_embeds: torch.Tensor,
            pad_token_id: int) -> tuple[RunningBatch, torch.Tensor]:
    """Run the prompts of new rows (left-padded together); their batch and the float32 logits of their next token."""
    width = max(len(ids) for ids in input_ids)
    pads = [width - len(ids) for ids in input_ids]
    device = model.device
    ids = torch.tensor([[pad_token_id] * p + row for p, row in zip(pads, input_ids)], device=device)
    mask = torch.tensor([[0] * p + [1] * len(row) for p, row in zip(pads, input_ids)], device=device)
    image_mask = torch.tensor([[0] * p + row for p, row in zip(pads, image_masks)], dtype=torch.bool, device=device)
    text_model = model.text_model
    cache = DynamicCache(config=text_model.config)
    output = text_model(
        input_ids=ids, attention_mask=mask, image_embeds=image_embeds, image_embeds_position_mask=image_mask,
        position_ids=positions_from_mask(mask, text_model.config.pad_token_id), past_key_values=cache,
        use_cache=True, logits_to_keep=1,
    )
    return RunningBatch(output.past_key_values, mask), _last_logits(output)


@torch.inference_mode()
def decode_step(model, batch: RunningBatch, tokens: torch.Tensor) -> torch.Tensor:
    """Feed each row's newest token; the float32 logits of the token after it (the cache and mask grow by one)."""
    text_model = model.text_model
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.size, 1))], dim=1)
    positions = positions_from_mask(batch.mask, text_model.config.pad_token_id)[:, -1:]
    output = text_model(
        input_ids=tokens.view(-1, 1).to(model.device), attention_mask=batch.mask, position_ids=positions,
        past_key_values=batch.cache, use_cache=True, logits_to_keep=1,
    )
    batch.cache = output.past_key_values
    return _last_logits(output)


def _last_logits(output) -> torch.Tensor:
    """What `generate` scores: the last position's logits, copied as float32."""
    return output.logits[:, -1].to(copy=True, dtype=torch.float32)


def merge(running: RunningBatch | None, joining: RunningBatch) -> RunningBatch:
    """One batch of `running`'s rows then `joining`'s, the narrower side left-padded to the common width."""
    if running is None or running.size == 0:
        return joining
    width = max(running.mask.shape[1], joining.mask.shape[1])
    for target, source in zip(running.cache.layers, joining.cache.layers):
        target.keys = torch.cat([_pad_left(target.keys, width), _pad_left(source.keys, width)], dim=0)
        target.values = torch.cat([_pad_left(target.values, width), _pad_left(source.values, width)], dim=0)
    running.mask = torch.cat([_pad_left(running.mask, width), _pad_left(joining.mask, width)], dim=0)
    return running


def keep_rows(batch: RunningBatch, rows: list[int]) -> RunningBatch | None:
    """The batch of only `rows` (None if none), without the leading columns that are padding in every kept row."""
    if not rows:
        return None
    if rows == list(range(batch.size)):
        return batch
    index = torch.tensor(rows, device=batch.mask.device)
    mask = batch.mask.index_select(0, index)
    start = int(mask.any(dim=0).long().argmax())  # first column some kept row uses
    for layer in batch.cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    batch.mask = mask[:, start:]
    return batch


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` with zeros prepended along its sequence axis (-2 for cache tensors, -1 for masks) up to `width`."""
    axis = -1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
