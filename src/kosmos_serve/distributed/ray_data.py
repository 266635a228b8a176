"""`annotate --ray` and `evaluate --ray`: the same jobs as the local runners, as a Ray Data pipeline on a cluster.

The work list is a Ray dataset (one row per image, or per benchmark prompt); one `map_batches` stage runs
an actor class that holds one engine per worker (`concurrency` = `--workers`), reads and decodes the images
on the worker (so their paths must be the same on every node: a shared filesystem), and hands back the
records the local run writes; the driver appends them to `--out` as each batch comes back (in the order
they finish). Resuming works as locally: what `--out` already holds is left out before anything is sent.

A worker that cannot load the model answers its first batch with that error instead of results; the
driver then stops the job with the worker's message (rather than Ray restarting the actor forever).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kosmos_serve.collections.records import DoneKey, PreviousRun, RecordAppender
from kosmos_serve.collections.runner import AnnotateRun, Job, Summary, stop_on_signals
from kosmos_serve.config import EngineSettings
from kosmos_serve.distributed.cluster import ClusterError, connected, worker_error
from kosmos_serve.engine import start_engine
from kosmos_serve.errors import KosmosServeError
from kosmos_serve.evaluation.backends import LocalBackend, Skipped
from kosmos_serve.evaluation.datasets import Split
from kosmos_serve.evaluation.runner import Outcome, PredictionLog, SplitResult, prediction_record
from kosmos_serve.generation import GenerationParams


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a job runs: the cluster's address (None: RAY_ADDRESS, else a local cluster), the workers."""

    address: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass(frozen=True)
class WorkerFailure:
    """What a worker hands back instead of results when it cannot work: why, naming its node."""

    message: str


def left_to_do(jobs: list[Job], done: set[DoneKey]) -> tuple[list[Job], int]:
    """The jobs whose image, as its file is now, has no record in `done` yet; and how many were left out."""
    done_paths = {resolved for resolved, _ in done}
    todo = [job for job in jobs if str(job.entry.resolved) not in done_paths or file_key(job.entry.resolved) not in done]
    return todo, len(jobs) - len(todo)


def file_key(path: Path) -> DoneKey:
    """(resolved path, sha256 of the file's bytes), the key of a done image; sha256 None when unreadable."""
    try:
        return str(path), hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return str(path), None


def load_engine(settings: EngineSettings, cpus: float):
    """(engine, None), or (None, WorkerFailure) naming the worker's node; `cpus` torch threads unless the settings say."""
    import ray  # the ray extra: imported where used, so this module imports (and explains) without it

    try:  # `cpus` threads: the worker's own claim (settings.threads, when set, wins)
        return start_engine(settings.model_copy(update={"threads": settings.threads or max(1, int(cpus))})), None
    except KosmosServeError as error:
        return None, WorkerFailure(f"the worker on {ray.util.get_node_ip_address()}: {error.message}")


class AnnotateWorker:
    """A Ray Data actor: one engine; a batch of jobs in, their annotate records out (read and decoded here)."""

    def __init__(self, settings: EngineSettings, params: GenerationParams, model: str, ontology: dict | None,
                 decode_threads: int, cpus: float):
        engine, self.failure = load_engine(settings, cpus)
        self.run = AnnotateRun(engine, None, set(), params=params, model=model, ontology=ontology)
        self.decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="annotate-decode")

    def __call__(self, batch: dict) -> dict:
        if self.failure is not None:
            return {"result": [pickle.dumps(self.failure)]}
        loaded = list(self.decoders.map(self.run.load, map(pickle.loads, batch["item"])))
        return {"result": [pickle.dumps(record) for record in self.run.annotate_batch(loaded)]}


class EvaluateWorker:
    """A Ray Data actor: one engine; a batch of benchmark prompts in, each one's generation (or why skipped) out."""

    def __init__(self, settings: EngineSettings, params: GenerationParams, cpus: float):
        engine, self.failure = load_engine(settings, cpus)
        self.backend = LocalBackend(engine, params) if engine is not None else None

    def __call__(self, batch: dict) -> dict:
        if self.failure is not None:
            return {"result": [pickle.dumps(self.failure)]}
        items = [pickle.loads(item) for item in batch["item"]]
        generations = self.backend.generate([example for _, example in items])
        return {"result": [pickle.dumps((split, example.key, generated))
                           for (split, example), generated in zip(items, generations)]}


def run_stage(items: list, worker: type, arguments: dict, options: RayOptions, batch_size: int,
              show_progress: bool) -> Iterator[list]:
    """`items` through one map_batches stage of `worker` actors; yields each batch's results as it comes back."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = show_progress
    logging.getLogger("ray.data").setLevel(logging.INFO if show_progress else logging.WARNING)
    dataset = ray.data.from_items([{"item": pickle.dumps(item)} for item in items])
    results = dataset.map_batches(
        worker, fn_constructor_kwargs={**arguments, "cpus": options.cpus_per_worker}, batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=options.workers), num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker)
    try:
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            answers = [pickle.loads(result) for result in batch["result"]]
            failure = next((answer for answer in answers if isinstance(answer, WorkerFailure)), None)
            if failure is not None:
                raise ClusterError(f"A Ray worker cannot run the model, so the job stopped: {failure.message}")
            yield answers
    except ray.exceptions.RayError as error:
        raise worker_error(error) from None


def annotate_on_ray(jobs: list[Job], out: Path, previous: PreviousRun, *, settings: EngineSettings,
                    params: GenerationParams, ontology: dict | None, batch_size: int, decode_threads: int,
                    options: RayOptions, show_progress: bool = False) -> Summary:
    """Annotate the jobs not in `out` yet on a Ray cluster, appending records as batches come back."""
    summary = Summary()
    todo, summary.skipped = left_to_do(jobs, previous.done)
    arguments = {"settings": settings, "params": params, "model": settings.model, "ontology": ontology,
                 "decode_threads": decode_threads}
    began = time.perf_counter()
    with RecordAppender(out, previous) as appender, stop_on_signals() as stop:
        if todo:
            with connected(options.address):
                for records in run_stage(todo, AnnotateWorker, arguments, options, batch_size, show_progress):
                    appender.append(records)
                    failed = sum("error" in record for record in records)
                    summary.annotated += len(records) - failed
                    summary.failed += failed
                    if stop.requested:
                        summary.stopped_by = stop.signal
                        break
    summary.seconds = time.perf_counter() - began
    return summary


def evaluate_on_ray(splits: list[Split], log: PredictionLog, *, settings: EngineSettings, params: GenerationParams,
                    batch_size: int, options: RayOptions, show_progress: bool = False) -> Outcome:
    """Score the examples not in `log` yet on a Ray cluster; each split's records in its file's order, as locally."""
    began = time.perf_counter()
    outcome = Outcome([], log.settings, "a Ray cluster", log.path, 0.0)
    pending = [(index, example) for index, split in enumerate(splits) for example in split.examples
               if log.earlier(split, example) is None]
    fresh: dict[tuple[int, str], dict] = {}
    skipped: dict[int, list] = defaultdict(list)
    examples = {(index, example.key): example for index, example in pending}
    arguments = {"settings": settings, "params": params}
    with stop_on_signals() as stop:
        if pending:
            with connected(options.address) as cluster:
                outcome.source = f"{cluster}, {options.workers} worker{'s' * (options.workers > 1)}"
                for results in run_stage(pending, EvaluateWorker, arguments, options, batch_size, show_progress):
                    log.append(score(results, splits, examples, fresh, skipped, log))
                    if stop.requested:
                        outcome.interrupted = True
                        break
    for index, split in enumerate(splits):
        result = SplitResult(split, skipped=skipped[index])
        for example in split.examples:
            earlier = log.earlier(split, example)
            result.resumed += earlier is not None
            record = earlier or fresh.get((index, example.key))
            if record is not None:
                result.records.append(record)
        outcome.results.append(result)
    outcome.seconds = time.perf_counter() - began
    return outcome


def score(results: list, splits: list[Split], examples: dict, fresh: dict, skipped: dict,
          log: PredictionLog) -> list[dict]:
    """The prediction records of one batch of worker results (kept in `fresh`); skipped examples go to `skipped`."""
    records = []
    for index, key, generated in results:
        example = examples[(index, key)]
        if isinstance(generated, Skipped):
            skipped[index].append((example, generated.reason))
        else:
            fresh[(index, key)] = prediction_record(splits[index], example, generated, log.settings)
            records.append(fresh[(index, key)])
    return records
