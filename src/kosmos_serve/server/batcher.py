"""Micro-batching: concurrent requests wait briefly, then run together on the one engine thread.

The engine is not thread-safe and a forward pass already uses every core, so exactly one worker
thread runs it. Requests queue in arrival order. The first waits up to `batch_timeout` for others
(at most `max_batch_size`); the engine then groups them by generation parameters, so requests
that cannot share a batch still run apart, and every request gets its own answer. A streamed
request runs alone, token by token. A request whose caller has gone (timed out or disconnected)
is dropped before it runs; a stream whose client left stops after the current token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kosmos_serve.engine import Engine, Request, Result
from kosmos_serve.errors import ClientGoneError, KosmosServeError, ServiceBusyError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    request: Request
    future: asyncio.Future
    on_text: Callable[[str], None] | None = None  # set for a streamed request
    cancelled: bool = False
    stop_event: threading.Event = field(default_factory=threading.Event)

    @property
    def streamed(self) -> bool:
        return self.on_text is not None

    @property
    def abandoned(self) -> bool:
        return self.cancelled or self.future.done()


@dataclass(frozen=True)
class BatchObserver:
    """Hooks the metrics attach to: queue depth changes, and each batch's size and results."""

    queue_depth: Callable[[int], None] = lambda depth: None
    batch_done: Callable[[int, list[Result]], None] = lambda size, results: None


class Batcher:
    """Queues requests for one engine and runs them in batches on a single worker thread."""

    def __init__(
        self, engine: Engine, *, max_batch_size: int, batch_timeout: float, max_queue: int,
        observer: BatchObserver | None = None,
    ):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.max_queue = max_queue
        self.observer = observer or BatchObserver()
        self._pending: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kosmos-engine")
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._serve_forever())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(ServiceBusyError("The service is shutting down."))
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(
        self, request: Request, timeout: float | None = None, client_gone: Callable[[], Awaitable[None]] | None = None
    ) -> Result:
        """Queue `request` and wait for its result.

        TimeoutError after `timeout` seconds; ClientGoneError as soon as `client_gone()` completes. Either
        way a job that has not started yet is dropped and never runs.
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
            job.cancelled = True  # a no-op once done; drops the job if its caller gave up first
            if gone is not None:
                gone.cancel()

    def stream(
        self, request: Request, client_gone: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncGenerator[str | Result, None]:
        """Queue `request` to run alone; the iterator yields each piece of text as generated, then the result.

        Queued at once (a full queue raises here). Closing the iterator early, or `client_gone`
        completing, drops the job if it is still queued and otherwise stops generation after the
        current token.
        """
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        job = self._enqueue(request, on_text=lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text))
        return self._relay(job, pieces, client_gone)

    @staticmethod
    async def _relay(
        job: _Job, pieces: asyncio.Queue[str], client_gone: Callable[[], Awaitable[None]] | None
    ) -> AsyncGenerator[str | Result, None]:
        gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        try:
            while True:
                piece = asyncio.ensure_future(pieces.get())
                await asyncio.wait({piece, job.future} | ({gone} if gone else set()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if piece.done():
                    yield piece.result()
                    continue
                piece.cancel()
                if not job.future.done():  # the client left
                    return
                while not pieces.empty():
                    yield pieces.get_nowait()
                yield job.future.result()
                return
        finally:
            job.cancelled = True
            job.stop_event.set()
            if gone is not None:
                gone.cancel()

    def _enqueue(self, request: Request, on_text: Callable[[str], None] | None = None) -> _Job:
        if len(self._pending) >= self.max_queue:
            raise ServiceBusyError(f"The queue is full ({self.max_queue} requests waiting); try again shortly.")
        job = _Job(request, asyncio.get_running_loop().create_future(), on_text)
        self._pending.append(job)
        self._arrived.set()
        self.observer.queue_depth(len(self._pending))
        return job

    async def _serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_abandoned()
            if not self._pending:  # sleep only on an empty queue: no arrival can be missed
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if not self._pending[0].streamed:
                await self._wait_for_company()
                self._drop_abandoned()
                if not self._pending:
                    continue
            batch = self._take_batch()
            self.observer.queue_depth(len(self._pending))
            await loop.run_in_executor(self._executor, self._run, loop, batch)

    async def _wait_for_company(self) -> None:
        """Let the first request wait up to `batch_timeout` for others to share its batch."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_timeout
        while sum(not job.streamed for job in self._pending) < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Job]:
        """The first waiting job alone if streamed, else up to `max_batch_size` unstreamed jobs in order."""
        if self._pending[0].streamed:
            return [self._pending.popleft()]
        batch = [job for job in self._pending if not job.streamed][: self.max_batch_size]
        for job in batch:
            self._pending.remove(job)
        return batch

    def _drop_abandoned(self) -> None:
        kept = [job for job in self._pending if not job.abandoned]
        if len(kept) != len(self._pending):
            self._pending = deque(kept)
            self.observer.queue_depth(len(self._pending))

    def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        """On the worker thread: run the batch; settle every job's future on the event loop."""
        live = [job for job in batch if not job.abandoned]
        if not live:
            return
        if live[0].streamed:
            job = live[0]
            outcomes = [_outcome(lambda: self.engine.stream(job.request, job.on_text, job.stop_event.is_set))]
        else:
            outcomes = _outcome(lambda: self.engine.run([job.request for job in live]))
            if isinstance(outcomes, Exception) and len(live) > 1:  # one bad request must not fail the rest
                outcomes = [_outcome(lambda job=job: self.engine.run([job.request])[0]) for job in live]
            elif isinstance(outcomes, Exception):
                outcomes = [outcomes]
        self.observer.batch_done(len(live), [result for result in outcomes if isinstance(result, Result)])
        for job, outcome in zip(live, outcomes):
            loop.call_soon_threadsafe(_settle, job.future, outcome)


def _outcome(work: Callable[[], Result | list[Result]]) -> Result | list[Result] | Exception:
    """The result of `work`, or the exception it raised (logged when it is not a domain error)."""
    try:
        return work()
    except KosmosServeError as error:
        return error
    except Exception as error:
        logger.exception("Inference failed")
        return error


def _settle(future: asyncio.Future, outcome: Result | Exception) -> None:
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
