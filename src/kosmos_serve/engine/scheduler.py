"""Who runs at each decode step: continuous batching on the one engine thread.

Each `Scheduler.step` runs one decode step for every running row, emits each row's new token,
retires the rows that finished (end of sequence, their own `max_new_tokens`, a stop callback for a
client that left), then admits waiting requests: their prompts are prefilled together and their
KV-cache rows appended to the running batch, so they decode with it from the next step on.

Every row keeps its own logits processors (transformers' own, built as `generate` builds them for
its parameters) and, when sampling, its own `torch.Generator` seeded with the request's seed. So a
greedy row equals transformers' `generate` run alone, and a seeded sampled row equals `generate`
run alone after `torch.manual_seed(seed)`, whatever shares its batch. Beam search keeps
`generate` (an exact path): such a request runs whole when admitted, between two steps.

The host's work per step is kept per batch, not per row, where it can be: one choice of every greedy
row's token (`engine/choice.py`), one log-softmax for the rows whose probabilities scoring reads
this step, and a streamed request's new token ids handed to its consumer, which detokenises them
off this thread (`engine/streaming.py`).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessorList

from kosmos_serve.engine.choice import RowChooser, choose_tokens
from kosmos_serve.engine.decode import RunningBatch, decode_step, keep_rows, merge, prefill
from kosmos_serve.engine.requests import PreparedRequest, Request, Row
from kosmos_serve.engine.results import Result, build_result
from kosmos_serve.engine.scoring import TokenEvidence, evidence_from_choices
from kosmos_serve.engine.streaming import StreamPiece
from kosmos_serve.generation import GenerationParams, generation_kwargs

if TYPE_CHECKING:  # the engine builds schedulers over itself
    from kosmos_serve.engine.engine import Engine


@dataclass(eq=False)
class Ticket:
    """One request in the scheduler: its rows (prompts), callbacks, and once done its result or error.

    A streamed request has `on_tokens`, called on the engine thread with each step's `StreamPiece` (its
    new token ids; its consumer makes text of them with a `TextStream`, off that thread).
    """

    prepared: PreparedRequest
    rows: list[Row]
    on_tokens: Callable[[StreamPiece], None] | None = None
    should_stop: Callable[[], bool] = lambda: False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    started_rows: int = 0
    finished_rows: int = 0
    result: Result | None = None
    error: Exception | None = None
    cancelled: bool = False  # its stop callback answered True
    features: dict[str, torch.Tensor] | None = None
    vision_seconds: dict[str, float] = field(default_factory=dict)
    cached_keys: set[str] = field(default_factory=set)

    @property
    def request(self) -> Request:
        return self.prepared.request

    @property
    def params(self) -> GenerationParams:
        """The request's parameters, defaults filled in."""
        return self.prepared.params

    @property
    def streamed(self) -> bool:
        return self.on_tokens is not None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    @property
    def generated_tokens(self) -> int:
        return sum(row.generated_tokens for row in self.rows)


@dataclass(eq=False)
class _Sequence:
    """A row being decoded: its ids so far, the token chosen but not yet fed, how it chooses its tokens."""

    ticket: Ticket
    row: Row
    ids: list[int]
    chooser: RowChooser
    eos_ids: set[int]
    phrase_open: bool  # its ids end inside a phrase: scoring reads the next tokens' probabilities
    started_at: float
    evidence: TokenEvidence = field(default_factory=TokenEvidence)  # the model's probabilities, for scoring boxes
    new_tokens: int = 0
    pending: int | None = None
    finished: bool = False


class Scheduler:
    """Waiting requests and the running batch of one engine; `step` until not `busy`."""

    def __init__(self, engine: Engine, max_rows: int | None = None):
        self.engine = engine
        self.max_rows = max_rows or engine.settings.max_batch_rows
        self.waiting: deque[Ticket] = deque()
        self.sequences: list[_Sequence] = []
        self.batch: RunningBatch | None = None
        self._processors: dict[GenerationParams, tuple[LogitsProcessorList, set[int]]] = {}

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.sequences)

    @property
    def running_requests(self) -> int:
        """Requests with a row in the running batch."""
        return len({id(sequence.ticket) for sequence in self.sequences})

    def add(self, request: Request | PreparedRequest, on_tokens: Callable[[StreamPiece], None] | None = None,
            should_stop: Callable[[], bool] | None = None, submitted_at: float | None = None) -> Ticket:
        """Queue `request` (validated here unless prepared already: InvalidRequestError if bad); it joins the
        running batch at the next step. `on_tokens` streams it (see `Ticket`)."""
        prepared = request if isinstance(request, PreparedRequest) else self.engine.prepare(request)
        ticket = Ticket(prepared, self.engine.tokenise(prepared), on_tokens, should_stop or (lambda: False))
        if submitted_at is not None:
            ticket.submitted_at = submitted_at
        self.waiting.append(ticket)
        return ticket

    def step(self) -> list[Ticket]:
        """One decode step for the running rows, then admission of waiting requests; the tickets that finished."""
        finished: list[Ticket] = []
        if self.sequences:
            try:
                logits = decode_step(self.engine.model, self.batch, torch.tensor([s.pending for s in self.sequences]))
                self._choose(self.sequences, logits)
            except Exception as error:  # noqa: BLE001 - the running batch is lost; each of its requests says so
                self._fail_running(error, finished)
            self._retire(finished)
        self._admit(finished)
        return finished

    # admission

    def _admit(self, finished: list[Ticket]) -> None:
        capacity = self.max_rows - len(self.sequences)
        joining: list[_Sequence] = []
        with contextlib.suppress(Exception):  # a failure here is met again, request by request, below
            self.load_features([t for t in list(self.waiting)[: max(capacity, 0)] if not t.should_stop()])
        for ticket in list(self.waiting):
            if ticket.should_stop():
                self.waiting.remove(ticket)
                ticket.cancelled = True
                if not any(s.ticket is ticket for s in self.sequences + joining):
                    self._close_unstarted(ticket, finished)
                continue
            if ticket.params.num_beams > 1:
                self.waiting.remove(ticket)
                self._run_with_generate(ticket, finished)
                continue
            if ticket.streamed and any(s.ticket is ticket for s in self.sequences + joining):
                continue  # a streamed request's prompts run one after another, so its text reads in order
            if capacity <= 0:
                break
            if not self._load_features(ticket, finished):
                continue
            wanted = 1 if ticket.streamed else len(ticket.rows) - ticket.started_rows
            for row in ticket.rows[ticket.started_rows : ticket.started_rows + min(wanted, capacity)]:
                joining.append(self._sequence(ticket, row))
                ticket.started_rows += 1
                capacity -= 1
            if ticket.started_rows == len(ticket.rows):
                self.waiting.remove(ticket)
        if not joining:
            return
        try:
            embeds = torch.cat([s.ticket.features[s.row.image_key] for s in joining])
            tails = [self.engine.scored_tail(s.row.input_ids) for s in joining]
            new_phrases = self.engine.new_phrases([s.row.input_ids for s in joining])  # their priors, read alongside
            prefilled = prefill(
                self.engine.model, [s.row.input_ids for s in joining], [s.row.image_mask for s in joining], embeds,
                self.engine.pad_token_id, [s.row.image_key for s in joining], tails,
                self.engine.prior_continuations(new_phrases),
            )
            self.engine.learn_priors(new_phrases, prefilled.continuation_log_probs)
            batch = prefilled.batch
            for sequence, tail, log_probs in zip(joining, tails, prefilled.tail_log_probs):
                first = len(sequence.ids) - tail
                self.engine.note_evidence(log_probs, sequence.ids[first:], first, sequence.evidence)
            self._choose(joining, prefilled.logits)
        except Exception as error:  # noqa: BLE001 - handed to the request(s), whose caller reports it
            for sequence in joining:
                self._fail(sequence.ticket, error, finished)
            return
        self.batch = merge(self.batch, batch)
        self.sequences.extend(joining)
        self._retire(finished)

    def load_features(self, tickets: list[Ticket]) -> None:
        """Image features of `tickets` in one pass (each distinct image encoded once, in batches), shared by them."""
        tickets = [ticket for ticket in tickets if ticket.features is None and not ticket.done]
        if not tickets:
            return
        for ticket in tickets:
            if ticket.params.masks:  # the segmenter embeds the image in its own thread while Kosmos-2 runs
                self.engine.segmenter.prepare(ticket.request.image, ticket.rows[0].image_key)
        images = {row.image_key: ticket.request.image for ticket in tickets for row in ticket.rows}
        features, seconds, cached = self.engine.features_for(images)
        for ticket in tickets:
            ticket.features, ticket.vision_seconds, ticket.cached_keys = features, seconds, cached

    def _load_features(self, ticket: Ticket, finished: list[Ticket]) -> bool:
        if ticket.features is not None:
            return True
        try:
            self.load_features([ticket])
        except Exception as error:  # noqa: BLE001 - handed to the request(s), whose caller reports it
            self._fail(ticket, error, finished)
            return False
        return True

    def _sequence(self, ticket: Ticket, row) -> _Sequence:
        processors, eos_ids = self._processors_for(ticket.params, len(row.input_ids))
        generator = None
        if ticket.params.do_sample:
            generator = torch.Generator(device=self.engine.device)
            if ticket.params.seed is not None:
                generator.manual_seed(ticket.params.seed)
            else:
                generator.seed()
        phrase_open = self.engine.vocabulary.ends_in_phrase(row.input_ids)
        return _Sequence(ticket, row, list(row.input_ids), RowChooser(processors, generator), eos_ids, phrase_open,
                         time.perf_counter())

    def _processors_for(self, params: GenerationParams, prompt_length: int) -> tuple[LogitsProcessorList, set[int]]:
        """transformers' own logits processors and end-of-sequence ids for `params`, as `generate` builds them."""
        if params not in self._processors:
            text_model = self.engine.model.text_model
            config, _ = text_model._prepare_generation_config(None, **generation_kwargs(params))
            text_model._prepare_special_tokens(config, False, device=self.engine.device)
            processors = text_model._get_logits_processor(
                config, input_ids_seq_length=prompt_length, encoder_input_ids=torch.zeros(1, prompt_length, dtype=torch.long),
                device=self.engine.device, model_kwargs={},
            )
            eos = config._eos_token_tensor
            eos_ids = set() if eos is None else {int(token) for token in eos.view(-1)}
            self._processors[params] = (processors, eos_ids)
        return self._processors[params]

    # token choice and retirement

    def _choose(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """Each row's next token from the batch's `logits` (rows, vocab) as `generate` picks it, its evidence noted;
        then each row takes its token."""
        tokens = choose_tokens(logits, [sequence.chooser for sequence in sequences], [s.ids for s in sequences])
        self._note_evidence(sequences, logits, tokens)
        now = time.perf_counter()
        for sequence, token in zip(sequences, tokens):
            self._take(sequence, token, now)

    def _note_evidence(self, sequences: list[_Sequence], logits: torch.Tensor, tokens: list[int]) -> None:
        """The model's probabilities of the chosen tokens that scoring reads, from one log-softmax over their rows."""
        vocabulary = self.engine.vocabulary
        read = [index for index, (sequence, token) in enumerate(zip(sequences, tokens))
                if vocabulary.read_by_scoring(sequence.phrase_open, token)]
        if read:
            evidence_from_choices(torch.log_softmax(logits[read], dim=-1), [tokens[index] for index in read],
                                  [len(sequences[index].ids) for index in read],
                                  [sequences[index].evidence for index in read], vocabulary)

    def _take(self, sequence: _Sequence, token: int, now: float) -> None:
        """The row takes its chosen token: emitted to a streamed request, and whether the row is done noted."""
        ticket = sequence.ticket
        sequence.ids.append(token)
        sequence.new_tokens += 1
        sequence.pending = token
        sequence.phrase_open = self.engine.vocabulary.phrase_open_after(sequence.phrase_open, token)
        if ticket.first_token_at is None:
            ticket.first_token_at = now
        if ticket.on_tokens is not None:
            ticket.on_tokens(StreamPiece((token,)))
        if ticket.should_stop():
            ticket.cancelled = sequence.finished = True
        elif token in sequence.eos_ids or sequence.new_tokens >= ticket.params.max_new_tokens:
            sequence.finished = True

    def _retire(self, finished: list[Ticket]) -> None:
        kept = [index for index, sequence in enumerate(self.sequences) if not sequence.finished]
        for sequence in self.sequences:
            if sequence.finished and not sequence.ticket.done:
                try:
                    self._finish_row(sequence, time.perf_counter() - sequence.started_at, finished)
                except Exception as error:  # noqa: BLE001 - its output could not be read: that request says so alone
                    self._fail(sequence.ticket, error, finished)
        if len(kept) != len(self.sequences):
            self.batch = keep_rows(self.batch, kept) if self.batch is not None else None
            self.sequences = [self.sequences[index] for index in kept]

    def _finish_row(self, sequence: _Sequence, seconds: float, finished: list[Ticket]) -> None:
        ticket, row = sequence.ticket, sequence.row
        if ticket.on_tokens is not None:
            ticket.on_tokens(StreamPiece(prompt_done=True))
        image = ticket.request.image
        text = self.engine.decode(sequence.ids)
        row.output = self.engine.score(self.engine.parse(text, row.spec, image.size), row, sequence.ids,
                                       sequence.evidence)
        row.generated_tokens = sequence.new_tokens
        row.generation_seconds = seconds
        ticket.finished_rows += 1
        if ticket.should_stop() and ticket.started_rows < len(ticket.rows):
            ticket.cancelled = True
            if ticket in self.waiting:
                self.waiting.remove(ticket)
            self._close_unstarted(ticket, finished)
            return
        if ticket.finished_rows == len(ticket.rows):
            self._complete(ticket, finished)

    def _close_unstarted(self, ticket: Ticket, finished: list[Ticket]) -> None:
        """A request whose caller left: its prompts not yet started end with no new tokens, never run."""
        for row in ticket.rows[ticket.started_rows :]:
            text = self.engine.decode(row.input_ids)
            output = self.engine.parse(text, row.spec, ticket.request.image.size)
            row.output = self.engine.score(output, row, row.input_ids, TokenEvidence())
            ticket.started_rows += 1
            ticket.finished_rows += 1
        if ticket.finished_rows == len(ticket.rows) and not ticket.done:
            self._complete(ticket, finished)

    def _complete(self, ticket: Ticket, finished: list[Ticket]) -> None:
        result = build_result(ticket.prepared, ticket.rows, ticket.vision_seconds, ticket.cached_keys)
        if ticket.params.masks and not ticket.cancelled:
            try:
                result = self.engine.with_masks(result, ticket.request.image, ticket.rows[0].image_key)
            except Exception as error:  # noqa: BLE001 - handed to the request, whose caller reports it
                self._fail(ticket, error, finished)
                return
        ticket.result = result
        ticket.finished_at = time.perf_counter()
        finished.append(ticket)

    def _fail(self, ticket: Ticket, error: Exception, finished: list[Ticket]) -> None:
        if ticket.done:
            return
        ticket.error = error
        ticket.finished_at = time.perf_counter()
        if ticket in self.waiting:
            self.waiting.remove(ticket)
        finished.append(ticket)

    def _fail_running(self, error: Exception, finished: list[Ticket]) -> None:
        for sequence in self.sequences:
            self._fail(sequence.ticket, error, finished)
        self.sequences = []
        self.batch = None

    # the exact path for beam search

    def _run_with_generate(self, ticket: Ticket, finished: list[Ticket]) -> None:
        """A beam-search request through transformers' `generate`, all its prompts together, now."""
        if not self._load_features(ticket, finished):
            return
        try:
            self.engine.generate_rows(ticket.rows, ticket.features, ticket.params, ticket.request.image.size,
                                      should_stop=ticket.should_stop)
        except Exception as error:  # noqa: BLE001 - handed to the request(s), whose caller reports it
            self._fail(ticket, error, finished)
            return
        ticket.first_token_at = time.perf_counter()
        ticket.started_rows = ticket.finished_rows = len(ticket.rows)
        if ticket.on_tokens is not None:  # beam search streams nothing while it searches: the answer comes whole
            for row in ticket.rows:
                if row.output.raw_text:
                    ticket.on_tokens(StreamPiece(text=row.output.answer or row.output.text))
        self._complete(ticket, finished)
