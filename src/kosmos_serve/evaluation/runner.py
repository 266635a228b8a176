"""Benchmark examples through a backend in batches, each scored as it finishes and written to a predictions JSONL.

A predictions line (one per example) holds what error analysis needs and what a re-run needs to skip it:
    {"benchmark", "annotations" (the file's name), "split", "key", "image", "phrase", "prompt", "raw_text",
     "boxes" (predicted, pixels, in the order written), "truth" (pixels), "iou" (each predicted box's best),
     "hit", ["recall": {"1", "5", "10"}, "types"] (flickr30k), "model", "max_new_tokens", "no_repeat_ngram_size",
     "ground_truth"}
The detection benchmark writes one line per image instead, every phrase asked in "asked" (`detection.py`); a run
that scores masks adds "segmenter", and each phrase's "masks" and "mask_ious". The ocr benchmark writes one line per
page, the lines read and the true ones in "lines" and "truth" (`ocr_pages.py`).
Lines are appended a batch at a time with flush and fsync (the annotate command's `RecordAppender`); a run killed
mid-write leaves at most a torn last line, which the next run drops. A re-run with the same `--out` scores only
the examples not in the file yet, and refuses a file whose lines were made with other settings.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from kosmos_serve.collections.records import PreviousRun, RecordAppender
from kosmos_serve.collections.runner import stop_on_signals
from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import start_engine, start_segmenter
from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.evaluation.backends import (
    TRUE_BOXES,
    Generation,
    LocalBackend,
    ServiceBackend,
    Skipped,
    TrueBoxBackend,
)
from kosmos_serve.evaluation.datasets import (
    DETECTION_BENCHMARK,
    FLICKR_BENCHMARK,
    OCR_BENCHMARK,
    Example,
    Split,
    read_splits,
)
from kosmos_serve.evaluation.detection import detection_record, ground_truth_name, read_detection_splits
from kosmos_serve.evaluation.flickr_entities import FlickrEntities
from kosmos_serve.evaluation.metrics import RECALL_KS, best_ious, first_box_hit, recall_at_k
from kosmos_serve.evaluation.ocr_pages import ocr_record, read_ocr_splits
from kosmos_serve.generation import GenerationParams
from kosmos_serve.tasks import Task

ORIGINAL_NO_REPEAT_NGRAM_SIZE = 3  # the original evaluation scripts decode greedily with --no-repeat-ngram-size 3
DEFAULT_MAX_NEW_TOKENS = 128  # the original allows 500 tokens in all; the box of the phrase comes in the first few
OCR_MAX_NEW_TOKENS = 1024  # a page is long: Kosmos-2.5's own default (its model doc's examples)
SETTINGS_FIELDS = ("model", "max_new_tokens", "no_repeat_ngram_size", "ground_truth")  # on every line
SEGMENTER_FIELD = "segmenter"  # on the lines of a run that scores masks
IDENTITY_FIELDS = ("benchmark", "annotations", "key")


@dataclass(frozen=True)
class Settings:
    """What makes two runs' predictions the same experiment: the model, the decoding, the source of the truth."""

    model: str
    max_new_tokens: int
    no_repeat_ngram_size: int
    ground_truth: str = "mdetr"  # or "flickr30k_entities": the official folder's boxes and types
    segmenter: str | None = None  # the one whose masks are scored (none: masks are not)

    def as_dict(self) -> dict:
        settings = {name: getattr(self, name) for name in SETTINGS_FIELDS}
        return settings if self.segmenter is None else {**settings, SEGMENTER_FIELD: self.segmenter}


@dataclass
class SplitResult:
    """A split's scored predictions (earlier runs' included, in file order) and the examples skipped."""

    split: Split
    records: list[dict] = field(default_factory=list)
    skipped: list[tuple[Example, str]] = field(default_factory=list)
    resumed: int = 0


@dataclass
class Outcome:
    """Every split's result, the settings, and whether the run was stopped before the end."""

    results: list[SplitResult]
    settings: Settings
    source: str  # "this process" or the service's URL
    out: Path | None
    seconds: float
    interrupted: bool = False


def predicted_boxes(generation: Generation, phrase: str) -> list[tuple[float, float, float, float]]:
    """Boxes of every entity named `phrase` (spaces aside), in order, in the image's pixels (x * width, y * height).

    >>> g = Generation("", (("a man", ((0.5, 0.5, 1.0, 1.0),)), ("a dog", ((0.0, 0.0, 0.5, 0.5),))), (200, 100))
    >>> predicted_boxes(g, "a  man")
    [(100.0, 50.0, 200.0, 100.0)]
    """
    wanted = " ".join(phrase.split())
    width, height = generation.image_size
    return [(x1 * width, y1 * height, x2 * width, y2 * height)
            for name, boxes in generation.entities if " ".join(name.split()) == wanted
            for x1, y1, x2, y2 in boxes]


def prediction_record(split: Split, example: Example, generation: Generation, settings: Settings) -> dict:
    """The predictions line of one example: prompt, raw text, boxes, IoUs, hit (and recall@k for flickr30k); for
    detection, its image's line (`detection.detection_record`); for ocr, its page's (`ocr_pages.ocr_record`)."""
    if split.benchmark == DETECTION_BENCHMARK:
        return detection_record(split, example, generation, settings)
    if split.benchmark == OCR_BENCHMARK:
        return ocr_record(split, example, generation, settings)
    boxes = predicted_boxes(generation, example.phrase)
    record = {
        "benchmark": split.benchmark, "annotations": split.annotations.name, "split": split.name, "key": example.key,
        "image": example.file_name, "phrase": example.phrase, "prompt": example.prompt, "raw_text": generation.raw_text,
        "boxes": [list(box) for box in boxes], "truth": [list(box) for box in example.truth],
        "iou": best_ious(boxes, example.truth),
    }
    if split.benchmark == FLICKR_BENCHMARK:
        recall = {k: recall_at_k(boxes, example.truth, k) for k in RECALL_KS}
        record.update(hit=recall[1], recall={str(k): hit for k, hit in recall.items()}, types=list(example.types))
    else:
        record["hit"] = first_box_hit(boxes, example.truth[0])
    return {**record, **settings.as_dict()}


class PredictionLog:
    """The predictions file: lines earlier runs wrote (by identity), and this run's appended (none without a path).

    Earlier lines of the annotation files in `files` ((benchmark, file name) pairs; all files when None) must have
    been made with `settings`; lines of other files may share the file and are left as they are.
    """

    def __init__(self, path: Path | None, settings: Settings, files: set[tuple[str, str]] | None = None):
        self.path, self.settings, self.files = path, settings, files
        self.done: dict[tuple, dict] = {}
        previous = self._read() if path is not None and path.exists() else PreviousRun()
        self.appender = RecordAppender(path, previous) if path is not None else None

    def _read(self) -> PreviousRun:
        if not self.path.is_file():
            raise InvalidRequestError(f"--out {self.path} is not a file.")
        previous, offset = PreviousRun(), 0
        with open(self.path, "rb") as file:
            for number, line in enumerate(file, start=1):
                start, offset = offset, offset + len(line)
                record, problem = _parse(line)
                if problem is None:
                    self._check(number, record)
                    self.done[tuple(record[name] for name in IDENTITY_FIELDS)] = record
                    previous.records += 1
                elif not line.endswith(b"\n"):  # killed mid-write: the torn line is dropped before appending
                    offset = start
                elif line.strip():
                    raise InvalidRequestError(
                        f"--out {self.path} is not the predictions of an earlier evaluate run (line {number}: "
                        f"{problem}); choose another --out, or move the file away.")
                previous.add_newline = problem is None and not line.endswith(b"\n")
        previous.size, previous.keep = self.path.stat().st_size, offset
        return previous

    def _check(self, number: int, record: dict) -> None:
        if self.files is not None and (record["benchmark"], record["annotations"]) not in self.files:
            return
        settings = self.settings.as_dict()
        for name in (*SETTINGS_FIELDS, SEGMENTER_FIELD):
            if record.get(name) != settings.get(name):
                raise InvalidRequestError(
                    f"--out {self.path} line {number} was made with {name} {record.get(name)!r}, not this run's "
                    f"{settings.get(name)!r}; write to another --out (or move that file away) to score afresh.")

    def earlier(self, split: Split, example: Example) -> dict | None:
        """The line an earlier run wrote for this example, if any."""
        return self.done.get((split.benchmark, split.annotations.name, example.key))

    def append(self, records: list[dict]) -> None:
        """Write `records` durably (nothing without a path)."""
        if self.appender is not None:
            self.appender.append(records)

    def close(self) -> None:
        if self.appender is not None:
            self.appender.close()


def _parse(line: bytes) -> tuple[dict | None, str | None]:
    try:
        record = json.loads(line)
    except ValueError:
        return None, "not valid JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    scored = {DETECTION_BENCHMARK: "asked", OCR_BENCHMARK: "lines"}.get(record.get("benchmark"), "hit")
    missing = [name for name in (*IDENTITY_FIELDS, scored, *SETTINGS_FIELDS) if name not in record]
    return (record, None) if not missing else (None, f'it has no "{missing[0]}"')


def run(splits: Sequence[Split], backend, log: PredictionLog, *, batch_size: int = 16, show_progress: bool = False,
        source: str = "this process") -> Outcome:
    """Score every example of `splits` not already in `log`; stop after the current batch on SIGINT or SIGTERM."""
    began = time.perf_counter()
    outcome = Outcome([], log.settings, source, log.path, 0.0)
    todo = sum(log.earlier(split, example) is None for split in splits for example in split.examples)
    bar = tqdm(total=todo, unit="ex", desc="evaluate", file=sys.stderr, dynamic_ncols=True, disable=not show_progress)
    with bar, stop_on_signals() as stop:
        for split in splits:
            result, by_key = SplitResult(split), {}
            pending = []
            for example in split.examples:
                earlier = log.earlier(split, example)
                if earlier is None:
                    pending.append(example)
                else:
                    by_key[example.key] = earlier
                    result.resumed += 1
            for start in range(0, len(pending), batch_size):
                if stop.requested:
                    outcome.interrupted = True
                    break
                batch = pending[start : start + batch_size]
                fresh = []
                for example, generated in zip(batch, backend.generate(batch)):
                    if isinstance(generated, Skipped):
                        result.skipped.append((example, generated.reason))
                    else:
                        by_key[example.key] = prediction_record(split, example, generated, log.settings)
                        fresh.append(by_key[example.key])
                log.append(fresh)
                bar.update(len(batch))
            result.records = [by_key[example.key] for example in split.examples if example.key in by_key]
            outcome.results.append(result)
            if outcome.interrupted:
                break
    outcome.seconds = time.perf_counter() - began
    return outcome


def evaluate_benchmark(benchmark: str, annotations: Sequence[Path], images: Path, *, model: str | None = None,
                       url: str | None = None, out: Path | None = None, limit: int | None = None,
                       flickr_entities: Path | None = None, quantize: str = "none",
                       no_repeat_ngram_size: int = ORIGINAL_NO_REPEAT_NGRAM_SIZE,
                       max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 16,
                       show_progress: bool = False, on_cluster: Callable[..., Outcome] | None = None,
                       api_key: str | None = None, ontology: Path | None = None, segmenter: str | None = None,
                       masks_from_true_boxes: bool = False) -> Outcome:
    """Score a model (loaded here, served at `url` with `api_key`, or run by `on_cluster(splits, log, settings=,
    params=)`, which the CLI's --ray hands in) on a benchmark's annotation files; files are checked first.

    detection: `annotations` are COCO ground truth (with `ontology`, an `annotate --ontology` file), every box asked
    for with its score (`min_score` 0); with a `segmenter` (loaded here), with its mask too, scored against the
    annotations' segmentation; with `masks_from_true_boxes`, no model: the segmenter masks the true boxes.
    ocr: `annotations` are JSONL of each image's lines (`ocr_pages.py`)."""
    entities = FlickrEntities(flickr_entities) if flickr_entities is not None else None
    detection = benchmark == DETECTION_BENCHMARK
    if detection:
        splits = read_detection_splits(list(annotations), images, limit, ontology, masks=segmenter is not None)
    elif benchmark == OCR_BENCHMARK:
        splits = read_ocr_splits(list(annotations), images, limit)
    else:
        splits = read_splits(benchmark, list(annotations), images, limit, entities)
    params = GenerationParams(max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size,
                              min_score=0.0 if detection else None, masks=segmenter is not None)
    backend = ServiceBackend(url, params, api_key=api_key) if url is not None else None
    ground_truth = "flickr30k_entities" if entities is not None else "mdetr"
    if detection:
        ground_truth = ground_truth_name(ontology)
    elif benchmark == OCR_BENCHMARK:
        ground_truth = "ocr lines"
    name = TRUE_BOXES if masks_from_true_boxes else backend.model if backend else str(model)
    # a file of other settings is refused before the model loads
    log = PredictionLog(out, Settings(name, max_new_tokens, no_repeat_ngram_size, ground_truth, segmenter),
                        {(split.benchmark, split.annotations.name) for split in splits})
    try:
        if on_cluster is not None:
            return on_cluster(splits, log, settings=_engine_settings(str(model), quantize, batch_size, params,
                                                                     segmenter), params=params)
        if masks_from_true_boxes:
            settings = EngineSettings(segmenter=segmenter)
            backend = TrueBoxBackend(start_segmenter(settings), settings.max_image_pixels)
        else:
            if backend is None:
                backend = LocalBackend(start_engine(_engine_settings(str(model), quantize, batch_size, params,
                                                                     segmenter)), params)
            check_model_runs(benchmark, backend)
        return run(splits, backend, log, batch_size=batch_size, show_progress=show_progress,
                   source=url or "this process")
    finally:
        log.close()
        if backend is not None:
            backend.close()


def check_model_runs(benchmark: str, backend: LocalBackend | ServiceBackend) -> None:
    """The model behind `backend` has the benchmark's task, else an error naming the family the benchmark needs."""
    task = {DETECTION_BENCHMARK: Task.DETECTION, OCR_BENCHMARK: Task.OCR}.get(benchmark, Task.RAW)
    if backend.tasks is None or task.value in backend.tasks:
        return
    if task is Task.OCR:
        raise InvalidRequestError(f"--benchmark ocr reads pages with a Kosmos-2.5 (task ocr), and {backend.model!r} is "
                                  f"a {backend.family} model; give a Kosmos-2.5 (microsoft/kosmos-2.5, or a folder).")
    raise InvalidRequestError(f"--benchmark {benchmark} grounds phrases with a Kosmos-2 (task {task.value}), and "
                              f"{backend.model!r} is a {backend.family} model; score a Kosmos-2.5 with --benchmark "
                              "ocr.")


def _engine_settings(model: str, quantize: str, batch_size: int, params: GenerationParams,
                     segmenter: str | None) -> EngineSettings:
    """The engine settings of a run, its decoding parameters checked against their limits first."""
    settings = EngineSettings(model=model, max_batch_rows=batch_size, quantize=quantize, segmenter=segmenter)
    params.validate(settings.max_new_tokens_cap)
    return settings

