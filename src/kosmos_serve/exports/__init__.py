"""Exports of annotation records (`kosmos-serve annotate`'s JSONL): COCO, Label Studio, supervision.

`export_records` is `kosmos-serve export`; `to_detections` turns one result into
`supervision.Detections`. Every format reads the boxes the same way (`records`): failed records
left out, reversed corners put in order, boxes of zero size left out, each counted in the report;
every box keeps its own score (COCO `score`, Label Studio region `score`, supervision `confidence`).
Records with masks (`annotate --masks`) export them too: COCO `segmentation` (run-length encoding) and
`area`, Label Studio `brushlabels` or `polygonlabels` (`mask_format`), supervision's `mask`. Records of task ocr
export their lines read: COCO annotations with the text in `attributes`, Label Studio's OCR template (a rectangle and
a transcription per line). `text` and `markdown` write one file per image into a folder: its record's text or markdown.
Nothing here imports torch or transformers; supervision is imported only by `to_detections`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from pathlib import Path

from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.exports.coco import to_coco
from kosmos_serve.exports.detections import MissingExtraError, to_detections
from kosmos_serve.exports.label_studio import (
    DEFAULT_FROM_NAME,
    DEFAULT_TO_NAME,
    LABEL_STUDIO_LOCAL_FILES,
    MASK_FORMATS,
    label_studio_config,
    to_label_studio,
)
from kosmos_serve.exports.pages import PAGE_SUFFIXES, page_files
from kosmos_serve.exports.records import (
    AnnotatedImage,
    ExportReport,
    LabelledBox,
    annotated_images,
    order_box,
    read_records,
)

__all__ = [
    "FORMATS", "MASK_FORMATS", "AnnotatedImage", "ExportReport", "LabelledBox", "MissingExtraError",
    "annotated_images",
    "export_records", "label_studio_config", "order_box", "read_records", "to_coco", "to_detections",
    "to_label_studio",
]

FORMATS = ("coco", "label-studio", *PAGE_SUFFIXES)


def export_records(records_path: str | Path, format_name: str, out: str | Path, *,
                   relative_to: str | Path | None = None, image_root: str | None = None,
                   from_name: str | None = None, to_name: str | None = None,
                   label_config: str | Path | None = None, mask_format: str | None = None) -> ExportReport:
    """Read `records_path`, write `out` in `format_name` (for text and markdown, a folder of one file per image); bad
    input raises before anything is written.

    `image_root`, `from_name`, `to_name`, `label_config` (a labeling config file to write too, each
    label with the phrases its boxes were found for as `predicted_values`) and `mask_format` (regions of the
    boxes' masks, "brush" or "polygon", instead of rectangles) are for label-studio only.
    """
    if format_name not in FORMATS:
        raise InvalidRequestError(f"unknown format {format_name!r}; choose {', '.join(FORMATS[:-1])} or {FORMATS[-1]} "
                                  "(supervision Detections come from the Python helper "
                                  "kosmos_serve.exports.to_detections).")
    if mask_format is not None and mask_format not in MASK_FORMATS:
        raise InvalidRequestError(f"unknown --mask-format {mask_format!r}; choose {' or '.join(MASK_FORMATS)}.")
    label_studio_only = {"--image-root": image_root, "--from-name": from_name, "--to-name": to_name,
                         "--label-config": label_config, "--mask-format": mask_format}
    given = [flag for flag, value in label_studio_only.items() if value is not None]
    if format_name != "label-studio" and given:
        raise InvalidRequestError(f"{' and '.join(given)} apply to --format label-studio only.")
    records_path, out = Path(records_path), Path(out)
    targets = [out] + ([Path(label_config)] if label_config is not None else [])
    if format_name in PAGE_SUFFIXES:
        if out.is_file():
            raise InvalidRequestError(f"--out {out} is a file; --format {format_name} writes a folder of one file per "
                                      "image.")
    elif out.is_dir():
        raise InvalidRequestError(f"--out {out} is a folder; --format {format_name} writes one file.")
    if any(os.path.abspath(target) == os.path.abspath(records_path) for target in targets):
        raise InvalidRequestError(f"--out would overwrite the records {records_path}; write elsewhere.")
    report = ExportReport(format=format_name, out=str(out))
    images = annotated_images(read_records(records_path, report), relative_to, report)
    files = {}
    if format_name in PAGE_SUFFIXES:
        files = page_files(images, format_name, out)
        if any(os.path.abspath(path) == os.path.abspath(records_path) for path in files):
            raise InvalidRequestError(f"--out would overwrite the records {records_path}; write elsewhere.")
    elif format_name == "coco":
        files[out] = as_json(to_coco(images))
    else:
        from_name, to_name = from_name or DEFAULT_FROM_NAME, to_name or DEFAULT_TO_NAME
        image_root = LABEL_STUDIO_LOCAL_FILES if image_root is None else image_root
        files[out] = as_json(to_label_studio(images, from_name, to_name, image_root, mask_format, report))
        if label_config is not None:
            phrases_by_label = defaultdict(set)
            for box in (box for image in images for box in image.boxes):
                phrases_by_label[box.label].add(box.phrase)
            transcribed = any(image.lines for image in images)
            files[Path(label_config)] = label_studio_config(phrases_by_label, from_name, to_name, mask_format,
                                                            transcribed) + "\n"
            report.label_config = str(label_config)
    for path, text in files.items():
        write_text(path, text)
    return report


def as_json(payload) -> str:
    """`payload` as indented JSON text (UTF-8 kept readable)."""
    return json.dumps(payload, ensure_ascii=False, indent=2) + "\n"


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a temporary file beside it, then a rename)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise InvalidRequestError(f"cannot write {path}: {error.strerror}.") from None
