"""The JSONL records of `kosmos-serve annotate`: one line per image, appended a batch at a time, crash-safe.

An annotated image:
    {"path", "resolved", "sha256", "width", "height", "task", "prompt", "text", "answer", "raw_text",
     "entities": [{"phrase", "class", "span", "boxes", "pixel_boxes", "scores"[, "masks", "mask_scores"]}], "markdown",
     ["lines": [{"text", "corners", "box"}],] "generated_tokens", "model", "quantize", "min_score", "nms_iou",
     "kosmos_serve_version"}
  `scores` holds each box's score (same order as its boxes); `min_score` is the threshold the run kept boxes at
  (annotate drops boxes scored under it, for every task), `nms_iou` the overlap above which a box gave way to a
  likelier phrase's (null: none did), `quantize` the engine's weight setting. With --masks, each
  entity also has a mask per box (COCO RLE, `{"size": [h, w], "counts"}`) and the segmenter's score for it.
  Read with task `ocr` (Kosmos-2.5), `lines` holds every line read, its text, its box's four corners and its box
  (x1, y1, x2, y2), in pixels of the image as a viewer sees it; no other task's record has `lines`.
An image that could not be annotated:
    {"path", "resolved", "sha256" (null when the file cannot be read), "width": null, "height": null, "task",
     "error": {"code", "message"}, "model", "kosmos_serve_version"}

Crash safety: a batch's lines go out in one write, then flush and fsync. A process killed mid-write
leaves at most its last line torn (no newline at the end of the file); the next run drops that line
before appending (or only adds its newline, when the line is whole), so every image is in the file
once, on a complete line. An image is done when a record with its resolved path and sha256 is there.

One file, one threshold: a run whose `min_score` or `nms_iou` differs from that of a record already in the file
is refused before it writes a line (its boxes would mix with boxes kept by another rule).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Self

from kosmos_serve.collections.inputs import ImageEntry
from kosmos_serve.engine import Result
from kosmos_serve.errors import InvalidRequestError, KosmosServeError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two runs on one file there are the user's to avoid
    fcntl = None

KOSMOS_SERVE_VERSION = version("kosmos-serve")
DoneKey = tuple[str, str | None]  # (resolved path, sha256 of the file's bytes or None when unreadable)


def annotated_record(entry: ImageEntry, sha256: str, result: Result, *, model: str, quantize: str,
                     min_score: float | None, nms_iou: float | None = None,
                     ontology: dict[str, str] | None = None) -> dict:
    """The record of an annotated image: `Result.to_dict()` without timings and cache state, each entity with its class
    (and for `ocr`, the lines read).

    `min_score` and `nms_iou` are those `result` was built with (the boxes they drop already dropped).
    """
    answer = result.to_dict()
    width, height = result.image_size
    entities = [{"phrase": e["phrase"], "class": (ontology or {}).get(e["phrase"]),
                 **{key: value for key, value in e.items() if key != "phrase"}} for e in answer["entities"]]
    lines = {"lines": answer["lines"]} if "lines" in answer else {}
    return {
        "path": entry.path, "resolved": str(entry.resolved), "sha256": sha256, "width": width, "height": height,
        "task": answer["task"], "prompt": answer["prompt"], "text": answer["text"], "answer": answer["answer"],
        "raw_text": answer["raw_text"], "entities": entities, "markdown": answer["markdown"], **lines,
        "generated_tokens": answer["generated_tokens"], "model": model, "quantize": quantize, "min_score": min_score,
        "nms_iou": nms_iou, "kosmos_serve_version": KOSMOS_SERVE_VERSION,
    }


def failed_record(entry: ImageEntry, sha256: str | None, task: str, error: KosmosServeError, *, model: str) -> dict:
    """The record of an image that could not be annotated: the error's code and its message for people."""
    return {
        "path": entry.path, "resolved": str(entry.resolved), "sha256": sha256, "width": None, "height": None,
        "task": task, "error": {"code": error.code, "message": error.message}, "model": model,
        "kosmos_serve_version": KOSMOS_SERVE_VERSION,
    }


def record_problem(record) -> str | None:
    """Why `record` is not an annotate record, or None when it is one.

    >>> record_problem({"path": "a.png"})
    'it has no "resolved"'
    """
    if not isinstance(record, dict):
        return "it is not a JSON object"
    for key in ("path", "resolved", "sha256", "task", "model", "kosmos_serve_version"):
        if key not in record:
            return f'it has no "{key}"'
    if not all(isinstance(record[key], str) for key in ("path", "resolved", "task")):
        return '"path", "resolved" and "task" are not all strings'
    if not (record["sha256"] is None or isinstance(record["sha256"], str)):
        return '"sha256" is neither a string nor null'
    if "error" in record:
        error = record["error"]
        has_both = isinstance(error, dict) and {"code", "message"} <= error.keys()
        return None if has_both else '"error" has no code and message'
    if not isinstance(record.get("entities"), list) or not isinstance(record.get("prompt"), str):
        return 'it has neither "error" nor "prompt" and "entities"'
    return None


@dataclass
class PreviousRun:
    """What an output file already holds: the images done, and how to make its end whole before appending."""

    done: set[DoneKey] = field(default_factory=set)
    records: int = 0
    # the threshold of each annotated record -> (line number, path) of the first record kept at it
    min_scores: dict[float | None, tuple[int, str]] = field(default_factory=dict)
    nms_ious: dict[float | None, tuple[int, str]] = field(default_factory=dict)  # the same, for the overlap
    size: int = 0  # bytes when read: if it has changed when we append, someone else is writing the file
    keep: int = 0  # bytes to keep; beyond them lies a torn last line
    add_newline: bool = False  # the last line is a whole record that lost only its newline

    @property
    def torn(self) -> bool:
        """Whether the file ends in a torn line (dropped, or given its newline, before the next append)."""
        return self.keep < self.size or self.add_newline

    def check_min_score(self, min_score: float | None, out: os.PathLike) -> None:
        """Refuse (InvalidRequestError) a run at `min_score` when the file holds boxes kept at another threshold."""
        _refuse_another(self.min_scores, "min_score", min_score, out, lambda threshold: (
            "every box (no min_score)" if threshold is None else f"boxes scored {threshold} or more"))

    def check_nms_iou(self, nms_iou: float | None, out: os.PathLike) -> None:
        """Refuse (InvalidRequestError) a run at `nms_iou` when the file holds boxes kept at another overlap."""
        _refuse_another(self.nms_ious, "nms_iou", nms_iou, out, lambda overlap: (
            "boxes kept however they overlap (no nms_iou)" if overlap is None
            else f"boxes that no likelier phrase's box overlapped by more than {overlap}"))


def _refuse_another(first_records: dict[float | None, tuple[int, str]], name: str, value: float | None,
                    out: os.PathLike, kept: Callable[[float | None], str]) -> None:
    """Refuse a run at `value` of the setting `name` when the file's records (`first_records`: per value, the first
    record's line and path) were kept at another; `kept` says what a value kept."""
    for other, (number, path) in first_records.items():
        if other != value:
            flag = "--" + name.replace("_", "-")
            raise InvalidRequestError(
                f"--out {out} line {number} holds {path} with {kept(other)}, not this run's {name} {value}; "
                f"give the same {flag}, or write to another --out (or move that file away) to annotate afresh."
            )


def read_previous(path: Path, check: Callable[[int, dict], None] | None = None) -> PreviousRun:
    """Read an earlier run's records from `path` (absent or empty: none); anything else there is an error.

    `check(line_number, record)` may refuse a record (raising) that this run could not continue.
    """
    previous = PreviousRun()
    if not path.exists():
        return previous
    if not path.is_file():
        raise InvalidRequestError(f"--out {path} is not a file.")
    offset = 0
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            start, offset = offset, offset + len(line)
            complete = line.endswith(b"\n")
            record, problem = _parse(line)
            if problem is None:
                previous.done.add((record["resolved"], record["sha256"]))
                previous.records += 1
                if "error" not in record:
                    previous.min_scores.setdefault(record.get("min_score"), (number, record["path"]))
                    previous.nms_ious.setdefault(record.get("nms_iou"), (number, record["path"]))
                if check is not None:
                    check(number, record)
            elif not complete:  # killed mid-write: drop the torn line
                offset = start
            elif line.strip():
                raise InvalidRequestError(
                    f"--out {path} is not the records of an earlier annotate run (line {number}: {problem}); "
                    "choose another --out, or move the file away."
                )
            previous.add_newline = problem is None and not complete
    previous.size, previous.keep = path.stat().st_size, offset
    return previous


def _parse(line: bytes) -> tuple[dict | None, str | None]:
    try:
        record = json.loads(line)
    except ValueError:
        return None, "not valid JSON"
    return record, record_problem(record)


class RecordAppender:
    """Appends record lines to the output, each batch in one write followed by flush and fsync.

    The file is opened (and locked against a second run) at the first append, so a run that fails
    before annotating anything leaves it untouched; a torn last line is mended then. Records kept at
    another threshold than the file's are refused before anything is written.
    """

    def __init__(self, path: Path, previous: PreviousRun):
        self.path = path
        self.previous = previous
        self._file = None

    def append(self, records: list[dict]) -> None:
        """Write `records`, one JSON line each, and make them durable."""
        if not records:
            return
        for min_score in {record.get("min_score") for record in records if "error" not in record}:
            self.previous.check_min_score(min_score, self.path)
        for nms_iou in {record.get("nms_iou") for record in records if "error" not in record}:
            self.previous.check_nms_iou(nms_iou, self.path)
        if self._file is None:
            self._open()
        self._file.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "ab")  # noqa: SIM115  (kept open across appends; closed by close())
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise InvalidRequestError(f"Another annotate run is writing {self.path}; wait for it.") from None
            if os.fstat(file.fileno()).st_size != self.previous.size:
                raise InvalidRequestError(f"{self.path} changed while this run started; is another run writing it?")
            if self.previous.keep < self.previous.size:
                file.truncate(self.previous.keep)
            if self.previous.add_newline:
                file.write(b"\n")
        except BaseException:
            file.close()
            raise
        self._file = file

    def close(self) -> None:
        """Close the file (and release its lock)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
