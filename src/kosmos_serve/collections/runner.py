"""Many images through the engine: decoded ahead in a thread pool, run in batches, written as each batch finishes.

`kosmos-serve annotate` is three modules: `inputs` (INPUT arguments -> images, each with its own
inputs), `records` (the JSONL output: record lines, what an earlier run did, crash-safe appends) and
this one. The main thread runs the model; a pool of threads reads, hashes and decodes the next images
meanwhile (PIL and hashlib release the GIL). An image whose resolved path and sha256 are already in
the output is skipped. SIGINT (Ctrl-C) or SIGTERM lets the batch in the model finish and be written,
then stops (images read ahead wait for the next run); a second one stops at once (the file stays
valid either way).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice

from PIL import Image
from tqdm import tqdm

from kosmos_serve.collections.inputs import ImageEntry
from kosmos_serve.collections.records import DoneKey, RecordAppender, annotated_record, failed_record
from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, Request, check_task
from kosmos_serve.errors import InvalidImageError, InvalidRequestError, KosmosServeError
from kosmos_serve.images import load_image
from kosmos_serve.tasks import PromptSpec, TaskInput, parse_task

logger = logging.getLogger(__name__)

MAX_ROWS = 32  # most prompts in one generate call: a batch's images x each one's prompts (detection: its phrases)
ANY_SIZE = 2**31  # a stand-in image size for checking inputs before any image is read: boxes are bounded per image


@dataclass(frozen=True)
class Job:
    """An image and what to ask about it; `prompt` is the prompt text its record will carry."""

    entry: ImageEntry
    task: TaskInput
    prompt: str


@dataclass
class Loaded:
    """What a decoding thread hands back: the image, or why it cannot be annotated, or that it is done already."""

    job: Job
    sha256: str | None
    image: Image.Image | None = None
    error: KosmosServeError | None = None
    done_before: bool = False


@dataclass
class Summary:
    """Counts and wall time of a run (time after the model is loaded)."""

    annotated: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    stopped_by: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run early

    @property
    def interrupted(self) -> bool:
        """Whether a signal stopped the run before every image was done."""
        return self.stopped_by is not None

    @property
    def images_per_second(self) -> float:
        """Annotated images per second of the run."""
        return self.annotated / self.seconds if self.seconds > 0 else 0.0


def check_inputs(task: TaskInput, params: GenerationParams, settings: EngineSettings) -> list[PromptSpec]:
    """The engine's own request check, before any image is read (box bounds wait for each image's size)."""
    return check_task(task, params, settings, (ANY_SIZE, ANY_SIZE))


def engine_settings(settings: EngineSettings, jobs: list[Job], batch_size: int) -> EngineSettings:
    """`settings` with room for a whole batch's prompts in one generate call (at most MAX_ROWS of them)."""
    prompts_per_image = max(job.prompt.count("\n") + 1 for job in jobs)
    return settings.model_copy(update={"max_batch_rows": min(batch_size * prompts_per_image, MAX_ROWS)})


def same_run_check(jobs: list[Job], model: str, out: os.PathLike) -> Callable[[int, dict], None]:
    """A check for `read_previous`: a record of one of these images must come from this model, task and prompt."""
    by_path = {str(job.entry.resolved): job for job in jobs}

    def check(number: int, record: dict) -> None:
        job = by_path.get(record["resolved"])
        if job is None:
            return
        ours = {"model": model, "task": parse_task(job.task.task).value}
        if "error" not in record:
            ours["prompt"] = job.prompt
        for key, value in ours.items():
            if record.get(key) != value:
                raise InvalidRequestError(
                    f"--out {out} line {number} holds {record['path']} with {key} {record.get(key)!r}, not this "
                    f"command's {value!r}; write to another --out (or move that file away) to annotate afresh."
                )

    return check


class AnnotateRun:
    """Annotates jobs through one engine into one output file.

    Boxes scored under `params.min_score` are dropped, for every task; without one, under the engine's
    default (`KOSMOS_MIN_SCORE`, else the model's, else built-in), so a collection holds only boxes a
    user can trust. Each record says the threshold it was kept at.
    """

    def __init__(self, engine: Engine, appender: RecordAppender, done: set[DoneKey], *, params: GenerationParams,
                 model: str, ontology: dict[str, str] | None = None, batch_size: int = 8, decode_threads: int = 4,
                 show_progress: bool = False):
        self.engine, self.appender, self.done = engine, appender, done
        self.params, self.model, self.ontology = params, model, ontology
        self.batch_size, self.decode_threads, self.show_progress = batch_size, decode_threads, show_progress

    @functools.cached_property
    def request_params(self) -> GenerationParams:
        """The run's parameters with its threshold set: the one given, else the engine's default."""
        if self.params.min_score is not None:
            return self.params
        return dataclasses.replace(self.params, min_score=self.engine.defaults.min_score)

    def run(self, jobs: list[Job]) -> Summary:
        """Annotate every job not done yet; on SIGINT or SIGTERM, stop once the batch in the model is written."""
        summary = Summary()
        began = time.perf_counter()
        done_paths = {resolved for resolved, _ in self.done}
        expected = sum(str(job.entry.resolved) not in done_paths for job in jobs)
        with progress_bar(expected, self.show_progress) as bar, stop_on_signals() as stop:
            batch: list[Loaded] = []
            for loaded in decode_ahead(jobs, self.load, self.decode_threads, window=2 * self.batch_size):
                if stop.requested:  # no new batch: the images read ahead are done by the next run
                    summary.stopped_by = stop.signal
                    break
                if loaded.done_before:
                    summary.skipped += 1
                    continue
                if str(loaded.job.entry.resolved) in done_paths:
                    bar.total += 1  # a file changed since the earlier run: annotated again
                batch.append(loaded)
                if len(batch) == self.batch_size:
                    self.finish(batch, summary)
                    bar.update(len(batch))
                    batch = []
            else:
                if batch:
                    self.finish(batch, summary)
                    bar.update(len(batch))
        summary.seconds = time.perf_counter() - began
        return summary

    def load(self, job: Job) -> Loaded:
        """Read, hash and decode one image (in a pool thread); a file already in the output is not decoded."""
        path = job.entry.resolved
        try:
            data = path.read_bytes()
        except OSError as error:
            if (str(path), None) in self.done:
                return Loaded(job, None, done_before=True)
            reason = (error.strerror or "unreadable").lower()
            return Loaded(job, None, error=InvalidImageError(f"The image file cannot be read ({reason})."))
        sha256 = hashlib.sha256(data).hexdigest()
        if (str(path), sha256) in self.done:
            return Loaded(job, sha256, done_before=True)
        try:
            return Loaded(job, sha256, image=load_image(data, max_pixels=self.engine.settings.max_image_pixels))
        except KosmosServeError as error:
            return Loaded(job, sha256, error=error)
        except Exception:  # a decoder bug on a hostile file must not end the run; the message stays generic
            logger.debug("decoding %s failed", path, exc_info=True)
            return Loaded(job, sha256, error=InvalidImageError("The image cannot be decoded."))

    def finish(self, batch: list[Loaded], summary: Summary) -> None:
        """Run a batch's images through the engine together and append all its records, in input order."""
        records = self.annotate_batch(batch)
        self.appender.append(records)
        failed = sum("error" in record for record in records)
        summary.annotated += len(records) - failed
        summary.failed += failed

    def annotate_batch(self, batch: list[Loaded]) -> list[dict]:
        """The records of a batch's images (run through the engine together), in input order."""
        records: list[dict | None] = [None] * len(batch)
        requests, positions = [], []
        for position, item in enumerate(batch):
            if item.error is None:
                try:  # boxes against this image's size
                    requests.append(self.engine.prepare(Request(item.image, item.job.task, self.request_params)))
                    positions.append(position)
                except KosmosServeError as error:
                    item.error = error
            if item.error is not None:
                task = parse_task(item.job.task.task).value
                records[position] = failed_record(item.job.entry, item.sha256, task, item.error, model=self.model)
        for position, prepared, result in zip(positions, requests, self.engine.run(requests) if requests else []):
            item = batch[position]
            records[position] = annotated_record(item.job.entry, item.sha256, result, model=self.model,
                                                 quantize=self.engine.settings.quantize,
                                                 min_score=self.request_params.min_score, nms_iou=prepared.nms_iou,
                                                 ontology=self.ontology)
        return records


def decode_ahead(jobs: Iterable[Job], load: Callable[[Job], Loaded], threads: int, window: int) -> Iterator[Loaded]:
    """`load(job)` of each job in order, computed by `threads` threads at most `window` jobs ahead of the reader."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="annotate-decode")
    remaining = iter(jobs)
    pending = deque(pool.submit(load, job) for job in islice(remaining, window))
    try:
        while pending:
            loaded = pending.popleft().result()
            pending.extend(pool.submit(load, job) for job in islice(remaining, 1))
            yield loaded
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def progress_bar(total: int, show: bool) -> Iterator[tqdm]:
    """A tqdm bar on stderr (images, images per second, time left); a silent one when `show` is False."""
    bar = tqdm(total=total, unit="img", desc="annotate", file=sys.stderr, dynamic_ncols=True, disable=not show)
    try:
        yield bar
    finally:
        bar.close()


class StopRequest:
    """Set by the first SIGINT or SIGTERM: the run stops once its current batch is written."""

    requested = False
    signal: int | None = None


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn the first SIGINT/SIGTERM into a stop request; a second one interrupts at once (KeyboardInterrupt)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield stop
        return

    def handle(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested, stop.signal = True, signum
        # os.write, not print: a handler may interrupt a print on the same stream
        os.write(2, b"\nStopping after the current batch (press Ctrl-C again to stop at once) ...\n")

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)



def describe(summary: Summary, out: os.PathLike) -> str:
    """The end-of-run summary: annotated, skipped as already done, failed, images per second."""
    lines = [(f"{summary.annotated} annotated, {summary.skipped} skipped as already done, {summary.failed} failed; "
              f"{summary.images_per_second:.2f} images/s ({summary.seconds:.1f} s). Records: {out}")]
    if summary.failed:
        lines.append(f"A failed image has an error line in {out} and counts as done: a re-run skips it "
                     "(delete its line to try it again).")
    if summary.interrupted:
        lines.append(f"Interrupted: every finished batch is in {out}. Run the same command again to continue "
                     "where it stopped; images already there are skipped.")
    return "\n".join(lines)
