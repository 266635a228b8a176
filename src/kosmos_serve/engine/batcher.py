"""Continuous batching for the service: requests join the engine's running batch as they arrive.

The engine is not thread-safe and a forward pass already uses every core, so exactly one thread
runs it: a loop of `Scheduler.step` (`engine/scheduler.py`). Requests queue in arrival order and
are admitted at the next decode step while fewer than `max_requests` requests are in the engine;
their prefill joins the running batch and each leaves it the moment it finishes. Streamed and
plain requests share the batch; the engine thread hands a streamed request only its new token ids,
which its relay turns into text on the event loop. When the engine is idle, the first arrival waits up to
`batch_timeout` for others so that simultaneous requests prefill together; a batch already
decoding is never waited for. A request whose caller has gone (timed out or disconnected) is
dropped before it runs, and stops after its current token if it is running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kosmos_serve.config import ServerSettings
from kosmos_serve.engine.engine import Engine
from kosmos_serve.engine.requests import PreparedRequest, Request
from kosmos_serve.engine.results import Result
from kosmos_serve.engine.scheduler import Scheduler, Ticket
from kosmos_serve.engine.streaming import StreamPiece, TextStream
from kosmos_serve.errors import ClientGoneError, KosmosServeError, ServiceBusyError

logger = logging.getLogger(__name__)
STOP_WAIT_S = 30.0  # longest `stop` waits for the engine thread to finish its step


@dataclass(eq=False)
class _Job:
    request: PreparedRequest
    future: asyncio.Future
    on_tokens: Callable[[StreamPiece], None] | None = None  # set for a streamed request
    cancelled: bool = False
    stop_event: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def streamed(self) -> bool:
        return self.on_tokens is not None

    @property
    def abandoned(self) -> bool:
        return self.cancelled or self.stop_event.is_set() or self.future.done()

    def should_stop(self) -> bool:
        """Polled by the engine thread after each token: the caller has gone."""
        return self.cancelled or self.stop_event.is_set()


@dataclass(frozen=True)
class BatchObserver:
    """Hooks the metrics attach to: queue depth; after each step, the requests it decoded, those running and
    those waiting after it;
    each finished request with its time to first token and time per output token (None where not defined)."""

    queue_depth: Callable[[int], None] = lambda depth: None
    step_done: Callable[[int, int, int], None] = lambda decoded, running, waiting: None
    request_done: Callable[[Result, float | None, float | None], None] = lambda result, first_token, per_token: None


class Batcher:
    """Queues requests for one engine and admits them to its scheduler, step by step, on one engine thread."""

    def __init__(
        self, engine: Engine, *, max_requests: int, batch_timeout: float, max_queue: int,
        observer: BatchObserver | None = None, stream_interval: float = 0.0,
    ):
        self.engine = engine
        self.max_requests = max_requests
        self.batch_timeout = batch_timeout
        self.max_queue = max_queue
        self.stream_interval = stream_interval  # seconds: a stream's tokens wake the event loop at most this often
        self.observer = observer or BatchObserver()
        self._pending: deque[_Job] = deque()
        self._lock = threading.Condition()  # guards _pending and _stopping; notified on arrival and on stop
        self._stopping = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kosmos-engine")
        self._worker: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = self._loop.run_in_executor(self._executor, self._engine_loop)

    async def stop(self) -> None:
        with self._lock:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
            self._lock.notify_all()
        for job in pending:
            if not job.future.done():
                job.future.set_exception(ServiceBusyError("The service is shutting down."))
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), STOP_WAIT_S)
            except (TimeoutError, asyncio.CancelledError):
                pass
            except Exception:
                logger.exception("The engine thread failed")
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(
        self, request: Request | PreparedRequest, timeout: float | None = None,
        client_gone: Callable[[], Awaitable[None]] | None = None,
    ) -> Result:
        """Validate `request` (unless prepared already: a bad one never reaches a batch), queue it and wait for its
        result.

        TimeoutError after `timeout` seconds; ClientGoneError as soon as `client_gone()` completes. Either
        way a job that has not started yet is dropped and never runs, and a running one stops.
        """
        job = self._enqueue(request)
        gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        try:
            done, _ = await asyncio.wait({job.future} | ({gone} if gone else set()), timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if job.future in done:
                return job.future.result()
            if gone in done:
                raise ClientGoneError("The client disconnected before its answer was ready.")
            raise TimeoutError
        finally:
            job.cancelled = True  # a no-op once done; drops or stops the job if its caller gave up first
            if gone is not None:
                gone.cancel()

    def stream(
        self, request: Request | PreparedRequest, client_gone: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncGenerator[str | Result, None]:
        """Validate and queue `request`; the iterator yields each piece of text as generated, then the result.

        Validated and queued at once (a bad request or a full queue raises here). Closing the iterator early,
        or `client_gone` completing, drops the job if it is still queued and otherwise stops generation after
        the current token.
        """
        pieces: asyncio.Queue[StreamPiece | None] = asyncio.Queue()  # None: the result is ready or the client left
        job = self._enqueue(request, on_tokens=_HandOff(asyncio.get_running_loop(), pieces, self.stream_interval))
        job.future.add_done_callback(lambda _: pieces.put_nowait(None))  # after the pieces the engine sent before it
        return self._relay(job, pieces, self.engine.text_stream(), client_gone)

    @staticmethod
    async def _relay(
        job: _Job, pieces: asyncio.Queue[StreamPiece | None], text: TextStream,
        client_gone: Callable[[], Awaitable[None]] | None,
    ) -> AsyncGenerator[str | Result, None]:
        """The request's text as the engine's pieces come (each settled piece as it was settled), then its result."""
        gone = asyncio.ensure_future(_then_wake(client_gone, pieces)) if client_gone is not None else None
        try:
            ended = False
            while not ended:
                waiting = [await pieces.get()]
                while not pieces.empty():
                    waiting.append(pieces.get_nowait())
                ended = None in waiting
                for piece in waiting:
                    if piece is not None and (settled := text.read(piece)):
                        yield settled
            if job.future.done():  # else the client left
                yield job.future.result()
        finally:
            job.cancelled = True
            job.stop_event.set()
            if gone is not None:
                gone.cancel()

    def _enqueue(self, request: Request | PreparedRequest,
                 on_tokens: Callable[[StreamPiece], None] | None = None) -> _Job:
        prepared = request if isinstance(request, PreparedRequest) else self.engine.prepare(request)
        job = _Job(prepared, asyncio.get_running_loop().create_future(), on_tokens)
        with self._lock:
            if self._stopping:
                raise ServiceBusyError("The service is shutting down.")
            if len(self._pending) >= self.max_queue:
                raise ServiceBusyError(f"The queue is full ({self.max_queue} requests waiting); try again shortly.")
            self._pending.append(job)
            depth = len(self._pending)
            self._lock.notify_all()
        self.observer.queue_depth(depth)
        return job

    # the engine thread

    def _engine_loop(self) -> None:
        """Admit arrivals, run one step, settle what finished; sleep only when nothing is queued or running."""
        scheduler = self.engine.scheduler()
        jobs: dict[int, _Job] = {}  # id(ticket) -> its job
        while True:
            admitted = self._take(scheduler, len(jobs))
            if admitted is None:
                break
            for job in admitted:
                try:
                    ticket = scheduler.add(job.request, on_tokens=job.on_tokens, should_stop=self._stop_check(job),
                                           submitted_at=job.arrived)
                except Exception as error:  # noqa: BLE001 - a bad request fails alone (logged unless a domain error)
                    self._settle(job, _logged(error))
                    continue
                jobs[id(ticket)] = job
            if not scheduler.busy:
                continue
            decoded = scheduler.running_requests  # the requests this step decodes
            finished = scheduler.step()
            self.observer.step_done(decoded, scheduler.running_requests, len(scheduler.waiting) + len(self._pending))
            for ticket in finished:
                job = jobs.pop(id(ticket))
                if ticket.error is not None:
                    self._settle(job, _logged(ticket.error))
                    continue
                if not ticket.cancelled:
                    self.observer.request_done(ticket.result, *_timings(ticket))
                self._settle(job, ticket.result)
        self.observer.step_done(0, 0, 0)
        for job in jobs.values():
            self._settle(job, ServiceBusyError("The service is shutting down."))

    def _stop_check(self, job: _Job) -> Callable[[], bool]:
        return lambda: job.should_stop() or self._stopping

    def _take(self, scheduler: Scheduler, in_engine: int) -> list[_Job] | None:
        """The jobs to admit now (None once stopping); when the engine is idle, sleeps until one arrives."""
        with self._lock:
            while True:
                if self._stopping:
                    return None
                self._drop_abandoned()
                room = self.max_requests - in_engine
                if not self._pending or room <= 0:
                    if scheduler.busy:
                        return []
                    self._lock.wait()
                    continue
                if not scheduler.busy and len(self._pending) < room:  # idle: let simultaneous arrivals share a prefill
                    remaining = self._pending[0].arrived + self.batch_timeout - time.perf_counter()
                    if remaining > 0:
                        self._lock.wait(remaining)
                        continue
                taken = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                depth = len(self._pending)
                break
        self.observer.queue_depth(depth)
        return taken

    def _drop_abandoned(self) -> None:
        kept = [job for job in self._pending if not job.abandoned]
        if len(kept) != len(self._pending):
            self._pending = deque(kept)
            self.observer.queue_depth(len(self._pending))

    def _settle(self, job: _Job, outcome: Result | Exception) -> None:
        _call_soon(self._loop, _settle, job.future, outcome)


def _timings(ticket: Ticket) -> tuple[float | None, float | None]:
    """Time to first token (from arrival) and time per output token after it, as vLLM reports them."""
    if ticket.first_token_at is None:
        return None, None
    first = ticket.first_token_at - ticket.submitted_at
    tokens = ticket.generated_tokens
    if ticket.params.num_beams > 1 or tokens < 2 or ticket.finished_at is None:
        return first, None
    return first, (ticket.finished_at - ticket.first_token_at) / (tokens - 1)


class _HandOff:
    """A streamed request's pieces, from the engine thread to its relay's queue on the event loop, a wake-up of the
    loop per `interval` seconds at most (0: one per piece).

    Each wake-up costs the engine thread: the loop takes the interpreter's lock to relay. When steps come faster
    than `interval`, the first piece after a hand-off asks the loop to collect in `interval`, and the pieces until
    then wait in order; a piece that ends a prompt or carries text is handed over at once with those before it, so
    every piece reaches the queue before the result's end mark (scheduled after it). The pieces are the same and in
    the same order whatever the interval; only when they reach the relay changes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue, interval: float):
        self._loop, self._pieces, self._interval = loop, pieces, interval
        self._waiting: list[StreamPiece] = []
        self._lock = threading.Lock()

    def __call__(self, piece: StreamPiece) -> None:
        """On the engine thread."""
        if self._interval <= 0:
            _call_soon(self._loop, self._pieces.put_nowait, piece)
            return
        with self._lock:
            self._waiting.append(piece)
            first = len(self._waiting) == 1
        if piece.prompt_done or piece.text:
            _call_soon(self._loop, self._collect)
        elif first:
            _call_soon(self._loop, self._loop.call_later, self._interval, self._collect)

    def _collect(self) -> None:
        """On the event loop: every waiting piece into the queue (none: a timer after an early hand-off)."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for piece in waiting:
            self._pieces.put_nowait(piece)


def _call_soon(loop: asyncio.AbstractEventLoop | None, callback, *args) -> None:
    """Run `callback` on the event loop from the engine thread (nothing once the loop has closed)."""
    if loop is None or loop.is_closed():
        return
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # closed meanwhile
        pass


async def _then_wake(client_gone: Callable[[], Awaitable[None]], pieces: asyncio.Queue) -> None:
    """Wait for the client to leave, then wake its relay."""
    await client_gone()
    pieces.put_nowait(None)


def _logged(error: Exception) -> Exception:
    """`error`, logged with its traceback unless it is a domain error meant for the client."""
    if not isinstance(error, KosmosServeError):
        logger.error("Inference failed", exc_info=error)
    return error


def _settle(future: asyncio.Future, outcome: Result | Exception) -> None:
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def start_batcher(engine: Engine, settings: ServerSettings, observer: BatchObserver | None = None) -> Batcher:
    """The batcher `settings` describe over `engine`, started on the running event loop."""
    batcher = Batcher(engine, max_requests=settings.max_batch_requests, batch_timeout=settings.batch_timeout_ms / 1000,
                      max_queue=settings.max_queue, observer=observer,
                      stream_interval=settings.stream_interval_ms / 1000)
    batcher.start()
    return batcher
