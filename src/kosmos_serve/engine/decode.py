"""One prefill or one decode step over the text decoder (Kosmos-2's or Kosmos-2.5's), for rows that join and leave a running batch.

The rows of a `RunningBatch` share one DynamicCache, left-padded to a common width, and an attention
mask that says which cache columns are real. Positions come from the mask (`cumsum * mask +
padding_idx`, prefill's own formula, as `families.PaddingAwareKosmos2TextForCausalLM` supplies them
to `generate`), so a row sees exactly the positions it sees alone, whatever joined before or after it.
Pad columns hold zeros and are masked: a masked key gets softmax weight exactly 0.

Two savings keep every row's numbers those of its solo run:
- Prompts that begin alike on one image (a detection's phrases: `<s><image>`, 64 image tokens,
  `</image><grounding><phrase>`, ...) prefill their common beginning once; each row then runs only
  its own remainder against a copy of that cache, after masked pad columns where remainders differ
  in length.
- Each cache layer keeps spare columns (`GrowingLayer`), so a decode step writes its new key and
  value in place instead of copying the whole cache as `DynamicLayer`'s concatenation does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_COLUMNS = 16  # cache columns reserved ahead: one copy of the cache per 16 decode steps, not one per step


@dataclass
class Continuations:
    """Token runs to read after a cached one-row beginning (phrases after the blank image's `<grounding><phrase>`),
    and the log-softmax of the beginning's next token (which scores each run's first token)."""

    beginning: RunningBatch
    next_log_probs: torch.Tensor
    runs: list[list[int]]


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


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into buffers with spare columns, appended to in place."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, added = self.keys.shape[-2] if self.keys.dim() == 4 else 0, key_states.shape[-2]
        buffers = getattr(self, "_buffers", None)
        if (buffers is None or buffers[0].shape[-2] < length + added or buffers[0].shape[0] != key_states.shape[0]
                or not _views_into(self.keys, buffers[0]) or not _views_into(self.values, buffers[1])):
            buffers = tuple(_with_spare_columns(old, new, length) for old, new in
                            ((self.keys, key_states), (self.values, value_states)))
            self._buffers = buffers
        buffers[0][:, :, length : length + added] = key_states
        buffers[1][:, :, length : length + added] = value_states
        self.keys, self.values = buffers[0][:, :, : length + added], buffers[1][:, :, : length + added]
        return self.keys, self.values


def _views_into(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether `tensor` is the leading columns of `buffer` (not a tensor that `merge` or `keep_rows` put there)."""
    return tensor.dim() == 4 and tensor.data_ptr() == buffer.data_ptr() and tensor.stride() == buffer.stride()


def _with_spare_columns(cached: torch.Tensor, new: torch.Tensor, length: int) -> torch.Tensor:
    """A buffer for `length` cached columns plus `new`'s and SPARE_COLUMNS more, the cached ones copied in."""
    batch, heads, added, width = new.shape
    buffer = new.new_empty((batch, heads, length + added + SPARE_COLUMNS, width))
    if length:
        buffer[:, :, :length] = cached
    return buffer


def _growing_cache(layers: int) -> DynamicCache:
    """An empty cache of `layers` GrowingLayers."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer() for _ in range(layers)]
    cache.layer_class_to_replicate = None
    return cache


@dataclass
class Prefilled:
    """New rows after their prompts: their batch, the float32 logits of their next token, per row the log-softmax
    (tokens, vocab) of the steps that read its scored tail, and each continuation's tokens' log-probabilities."""

    batch: RunningBatch
    logits: torch.Tensor
    tail_log_probs: list[torch.Tensor]
    continuation_log_probs: list[list[float]]


@torch.inference_mode()
def prefill(model, input_ids: list[list[int]], image_masks: list[list[int]], image_embeds: torch.Tensor,
            pad_token_id: int, image_keys: list[str] | None = None, tails: list[int] | None = None,
            continuations: Continuations | None = None) -> Prefilled:
    """Run the prompts of new rows, reading the last `tails[row]` prompt tokens of each (for scoring them), and
    read `continuations` in the same forward pass where the rows have one of their own after a shared beginning
    (else in one pass of their own).

    Rows of one image (same key in `image_keys`) whose prompts share their image span and more run
    that shared beginning once; each then runs its remainder alone against a copy of its cache. A
    shared beginning stops before any row's tail, so each row's tail is read in its own remainder.
    """
    tails = tails or [0] * len(input_ids)
    groups = _shared_beginnings(input_ids, image_masks, image_keys, tails)
    if all(len(rows) == 1 for rows, _ in groups):
        batch, logits = _prefill(model, input_ids, image_masks, image_embeds, pad_token_id, max(tails) + 1)
        read = read_continuations(model, continuations, pad_token_id) if continuations else []
        return Prefilled(batch, logits[:, -1], _tail_log_probs(logits, tails), read)
    firsts = [rows[0] for rows, _ in groups]
    beginnings = [input_ids[rows[0]][:shared] for rows, shared in groups]
    beginning_masks = [image_masks[rows[0]][:shared] for rows, shared in groups]
    lone_tails = [tails[rows[0]] if len(rows) == 1 else 0 for rows, _ in groups]  # a lone row's beginning is all of it
    shared_batch, shared_logits = _prefill(model, beginnings, beginning_masks, image_embeds[firsts], pad_token_id,
                                           max(lone_tails) + 1)
    order = [row for rows, _ in groups for row in rows]  # rows grouped; put back in the callers' order at the end
    group_of = [index for index, (rows, _) in enumerate(groups) for _ in rows]
    remainders = [input_ids[row][shared:] for rows, shared in groups for row in rows]
    ordered_tails = [tails[row] for row in order]
    vocab = shared_logits.shape[-1]
    logits = torch.empty((len(order), vocab), dtype=shared_logits.dtype, device=shared_logits.device)
    tail_log_probs = [logits.new_empty((0, vocab)) for _ in order]
    has_remainder = [index for index, remainder in enumerate(remainders) if remainder]
    runs = continuations.runs if continuations and has_remainder else []
    # Each row's copy of its beginning, then (for the one extension, after which they leave) the runs' copies of
    # theirs: copied once, into buffers with room for the extension.
    parts = [(shared_batch, group_of)] + ([(continuations.beginning, [0] * len(runs))] if runs else [])
    room = max([len(remainders[i]) for i in has_remainder] + [len(run) for run in runs], default=0)
    batch = _copy_rows_with_room(parts, room)
    read = []
    if has_remainder:
        extended = _extend(model, batch, has_remainder + list(range(len(order), len(order) + len(runs))),
                           [remainders[i] for i in has_remainder] + runs, pad_token_id,
                           max([tail + 1 for tail in ordered_tails] + [len(run) for run in runs]))
        own = extended[: len(has_remainder)]
        logits[has_remainder] = own[:, -1]
        for index, log_probs in zip(has_remainder, _tail_log_probs(own, [ordered_tails[i] for i in has_remainder])):
            tail_log_probs[index] = log_probs
        read = _read_runs(extended[len(has_remainder) :], continuations) if runs else []
    elif continuations:
        read = read_continuations(model, continuations, pad_token_id)
    whole = [index for index, remainder in enumerate(remainders) if not remainder]  # a prompt that is all beginning
    if whole:
        logits[whole] = shared_logits[[group_of[index] for index in whole], -1]
        wholes = shared_logits[[group_of[index] for index in whole]]
        for index, log_probs in zip(whole, _tail_log_probs(wholes, [ordered_tails[index] for index in whole])):
            tail_log_probs[index] = log_probs
    back = torch.argsort(torch.tensor(order, device=logits.device))
    return Prefilled(keep_rows(batch, back.tolist()), logits.index_select(0, back),
                     [tail_log_probs[i] for i in back.tolist()], read)


def _tail_log_probs(logits: torch.Tensor, tails: list[int]) -> list[torch.Tensor]:
    """Per row of `logits` (rows, kept positions, vocab), the log-softmax of the `tails[row]` steps before its last."""
    kept = logits.shape[1]
    return [torch.log_softmax(row[kept - 1 - tail : kept - 1], dim=-1) for row, tail in zip(logits, tails)]


def _prefill(model, input_ids, image_masks, image_embeds, pad_token_id, keep: int) -> tuple[RunningBatch, torch.Tensor]:
    """One forward pass over whole prompts, left-padded together; the float32 logits of their last `keep` positions."""
    width = max(len(ids) for ids in input_ids)
    pads = [width - len(ids) for ids in input_ids]
    device = model.device
    ids = torch.tensor([[pad_token_id] * p + row for p, row in zip(pads, input_ids)], device=device)
    mask = torch.tensor([[0] * p + [1] * len(row) for p, row in zip(pads, input_ids)], device=device)
    image_mask = torch.tensor([[0] * p + row for p, row in zip(pads, image_masks)], device=device)  # Kosmos-2.5's: -1 too
    text_model = model.text_model
    output = text_model(
        input_ids=ids, attention_mask=mask, image_embeds=image_embeds, image_embeds_position_mask=image_mask,
        position_ids=positions_from_mask(mask, text_model.config.pad_token_id),
        past_key_values=_growing_cache(text_model.config.num_hidden_layers),
        use_cache=True, logits_to_keep=keep,
    )
    return RunningBatch(output.past_key_values, mask), _float_logits(output)


def _extend(model, batch: RunningBatch, rows: list[int], remainders: list[list[int]], pad_token_id: int,
            keep: int) -> torch.Tensor:
    """Feed the remainders of `rows` after their cached beginnings (left-padded among themselves, masked pads).

    Every row of `batch` gets the new columns; rows not in `rows` get only masked pads (their logits
    are not asked for). The logits of each row in `rows`' last `keep` positions.
    """
    width = max(len(ids) for ids in remainders)
    ids = torch.full((batch.size, width), pad_token_id, dtype=torch.long, device=batch.mask.device)
    mask = torch.zeros((batch.size, width), dtype=batch.mask.dtype, device=batch.mask.device)
    for row, remainder in zip(rows, remainders):
        ids[row, width - len(remainder) :] = torch.tensor(remainder)
        mask[row, width - len(remainder) :] = 1
    batch.mask = torch.cat([batch.mask, mask], dim=1)
    text_model = model.text_model
    positions = positions_from_mask(batch.mask, text_model.config.pad_token_id)[:, -width:].contiguous()
    output = text_model(input_ids=ids, attention_mask=batch.mask, position_ids=positions,
                        past_key_values=batch.cache, use_cache=True, logits_to_keep=min(keep, width))
    batch.cache = output.past_key_values
    return _float_logits(output)[rows]


@torch.inference_mode()
def read_continuations(model, continuations: Continuations, pad_token_id: int) -> list[list[float]]:
    """The log-probability of each token of each run after the one-row beginning, read in one forward pass of
    their own (the runs together, left-padded among themselves, on copies of the beginning's cache)."""
    runs = continuations.runs
    rows = list(range(len(runs)))
    width = max(map(len, runs))
    logits = _extend(model, _copy_rows_with_room([(continuations.beginning, [0] * len(rows))], width), rows, runs,
                     pad_token_id, width)
    return _read_runs(logits, continuations)


def _read_runs(logits: torch.Tensor, continuations: Continuations) -> list[list[float]]:
    """Each run's tokens' log-probabilities from its rows' last kept logits (rows, kept positions, vocab)."""
    read = []
    for row, run in zip(logits, continuations.runs):
        steps = torch.log_softmax(row[row.shape[0] - len(run) : -1], dim=-1)
        read.append([float(continuations.next_log_probs[run[0]])]
                    + [float(step[token]) for step, token in zip(steps, run[1:])])
    return read


def _shared_beginnings(input_ids, image_masks, image_keys, tails) -> list[tuple[list[int], int]]:
    """Rows grouped by image and common beginning: (row indices, tokens they share); (rows, full length) alone.

    A beginning is shared only when it covers the whole image span (rows of one image then see the
    same image embeddings) and all grouped rows; rows of an image whose prompts differ before the
    image span ends stay alone. It ends before the step that reads any grouped row's tail.
    """
    by_image: dict[str, list[int]] = {}
    for row, key in enumerate(image_keys or []):
        by_image.setdefault(key, []).append(row)
    groups, grouped = [], set()
    for rows in by_image.values():
        if len(rows) < 2:
            continue
        shared = min([_common_length([input_ids[row] for row in rows])]
                     + [len(input_ids[row]) - tails[row] - 1 for row in rows if tails[row]])
        image_end = max(index for index, flag in enumerate(image_masks[rows[0]]) if flag) + 1 if any(image_masks[rows[0]]) else 0
        if shared > image_end:
            groups.append((rows, shared))
            grouped.update(rows)
    singles = [([row], len(input_ids[row])) for row in range(len(input_ids)) if row not in grouped]
    return groups + singles


def _common_length(sequences: list[list[int]]) -> int:
    """How many leading tokens all `sequences` have in common."""
    length = 0
    for tokens in zip(*sequences):
        if any(token != tokens[0] for token in tokens):
            break
        length += 1
    return length


def _copy_rows_with_room(parts: list[tuple[RunningBatch, list[int]]], room: int) -> RunningBatch:
    """One batch of copies of rows of several batches (each part's `rows`, in order), left-padded with zeros to
    their common width, in buffers with `room` (and SPARE_COLUMNS) more columns: the next `room` columns are
    appended in place, with no copy of the cache."""
    width = max(batch.mask.shape[1] for batch, _ in parts)
    cache = _growing_cache(len(parts[0][0].cache.layers))
    for number, layer in enumerate(cache.layers):
        sources = [(batch.cache.layers[number], rows) for batch, rows in parts]
        layer.lazy_initialization(sources[0][0].keys, sources[0][0].values)
        layer._buffers = tuple(_gathered([(getattr(source, kind), rows) for source, rows in sources], width, room)
                               for kind in ("keys", "values"))
        layer.keys, layer.values = (buffer[:, :, :width] for buffer in layer._buffers)
    mask = torch.cat([_pad_left(batch.mask[rows], width) for batch, rows in parts])
    return RunningBatch(cache, mask)


def _gathered(parts: list[tuple[torch.Tensor, list[int]]], width: int, room: int) -> torch.Tensor:
    """A (rows, heads, width + room + SPARE_COLUMNS, dim) buffer: each part's `rows` right-aligned in the first
    `width` columns, zeros before them."""
    first = parts[0][0]
    rows = sum(len(chosen) for _, chosen in parts)
    buffer = first.new_empty((rows, first.shape[1], width + room + SPARE_COLUMNS, first.shape[3]))
    target = 0
    for tensor, chosen in parts:
        pad = width - tensor.shape[-2]
        for row in chosen:
            buffer[target, :, :pad] = 0
            buffer[target, :, pad:width] = tensor[row]
            target += 1
    return buffer


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
    return _float_logits(output)[:, -1]


def _float_logits(output) -> torch.Tensor:
    """What `generate` scores: the kept positions' logits, copied as float32."""
    return output.logits.to(copy=True, dtype=torch.float32)


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
    leading = rows == list(range(len(rows)))
    for layer in batch.cache.layers:
        if leading:  # views, buffers too: what is left of their spare columns still takes the next steps in place
            layer.keys, layer.values = layer.keys[: len(rows), :, start:], layer.values[: len(rows), :, start:]
            if getattr(layer, "_buffers", None) is not None:
                layer._buffers = tuple(buffer[: len(rows), :, start:] for buffer in layer._buffers)
        else:
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
