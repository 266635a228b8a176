"""MDETR's pre-processed annotation files -> benchmark examples, each with the original evaluation's prompt.

RefCOCO, RefCOCO+, RefCOCOg (`finetune_refcoco_val.json`, `finetune_refcoco+_testA.json`, `finetune_refcocog_test.json`
...): COCO-style JSON whose every `images` entry is one referring expression (`caption`) of a COCO 2014 image
(`file_name`, looked for under `train2014/` or `val2014/` as the name says, as the original
`refcoco/cook_data.py` does; a flat folder of the files works too), with exactly one annotation, its `[x, y, w, h]`
box. Prompt: `<grounding><phrase>{caption}</phrase>`.

Flickr30k Entities (`final_flickr_separateGT_{val,test}.json`): each `images` entry is one caption of a Flickr30k
image; `tokens_positive_eval` lists the phrases to ground as character spans of it (the first span of each, as
`flickr_entities/cook_data.py` takes). One prompt per phrase: `<grounding>{caption[:start]} <phrase>{phrase}</phrase>`.
A phrase's true boxes are the annotations of its entry whose `tokens_positive` holds its span; with the official
annotations folder (`FlickrEntities`), its boxes and entity types from there, as `flickr_entities_evaluate.py`
reads them.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from kosmos_serve.errors import InvalidRequestError, KosmosServeError
from kosmos_serve.evaluation.metrics import xywh_to_xyxy
from kosmos_serve.tasks import Task, TaskInput

Box = tuple[float, float, float, float]

REFEXP_BENCHMARKS = ("refcoco", "refcoco+", "refcocog")
FLICKR_BENCHMARK = "flickr30k"
DETECTION_BENCHMARK = "detection"  # COCO-format ground truth, phrases = categories: evaluation/detection.py
OCR_BENCHMARK = "ocr"  # JSONL of each image's text lines, read by Kosmos-2.5: evaluation/ocr_pages.py
BENCHMARKS = (*REFEXP_BENCHMARKS, FLICKR_BENCHMARK, DETECTION_BENCHMARK, OCR_BENCHMARK)
SAMPLE_SEED = 0  # --limit's sample: the same examples on every run, so an interrupted run can continue

EXPECTED_REFEXP = (
    "expected one of MDETR's referring-expression files (finetune_refcoco_val.json, finetune_refcoco+_testA.json, "
    'finetune_refcocog_test.json ...: COCO-style JSON whose "images" each carry the expression in "caption" and '
    'whose "annotations" carry one [x, y, w, h] "bbox" per image)'
)
EXPECTED_FLICKR = (
    "expected MDETR's Flickr30k Entities file (final_flickr_separateGT_val.json or _test.json: COCO-style JSON whose "
    '"images" carry "caption" and "tokens_positive_eval", and whose "annotations" carry a [x, y, w, h] "bbox" and '
    '"tokens_positive")'
)


class AnnotationFormatError(KosmosServeError):
    """An annotation file or folder is not the kind the benchmark reads; the message names the expected format."""

    status = 422
    code = "invalid_annotations"


@dataclass(frozen=True)
class Example:
    """One thing to ground: the image, the words, the original prompt and the true boxes in the image's pixels."""

    key: str  # unique within its file: the entry id (refexp) or "entry id:phrase number" (flickr)
    file_name: str  # the image as the annotations name it
    image_path: Path
    phrase: str
    prompt: str
    truth: tuple[Box, ...]
    types: tuple[str, ...] = ()

    def task_input(self) -> TaskInput:
        """What the model is asked: the prompt exactly as written (task raw, no `<grounding>` added)."""
        return TaskInput(Task.RAW, prompt=self.prompt, grounding=False)


@dataclass(frozen=True)
class Split:
    """One annotation file of a benchmark and the examples of it a run scores."""

    benchmark: str
    annotations: Path
    images: Path  # the --images folder its examples' images were looked for in
    examples: list  # Example, or one per image: detection.DetectionExample, ocr_pages.PageExample
    available: int  # examples in the file (more than `examples` under --limit)
    ground_truth: dict | None = field(default=None, compare=False, repr=False)  # detection: the COCO file's content

    @property
    def name(self) -> str:
        return split_name(self.annotations)


def check_split_files(annotations: list[Path], images: Path) -> None:
    """Refuse (InvalidRequestError) an `--images` that is no folder, or two `--annotations` files of one name."""
    if not images.is_dir():
        raise InvalidRequestError(f"--images {images} is not a folder; give the folder that holds the images.")
    names = [path.name for path in annotations]
    require(len(set(names)) == len(names), "Two --annotations files have the same name; give each split once.")


def read_splits(benchmark: str, annotations: list[Path], images: Path, limit: int | None = None,
                entities=None) -> list[Split]:
    """Every annotation file of a benchmark read and checked (before any model is loaded), each sampled to `limit`."""
    if benchmark not in BENCHMARKS:
        raise InvalidRequestError(f"Unknown benchmark {benchmark!r}; choose one of: {', '.join(BENCHMARKS)}.")
    if benchmark == DETECTION_BENCHMARK:
        raise InvalidRequestError("COCO ground truth is read by kosmos_serve.evaluation.detection.read_detection.")
    if benchmark == OCR_BENCHMARK:
        raise InvalidRequestError("OCR ground truth is read by kosmos_serve.evaluation.ocr_pages.read_ocr_splits.")
    check_split_files(annotations, images)
    splits = []
    for path in annotations:
        if benchmark == FLICKR_BENCHMARK:
            examples = read_flickr(path, images, entities)
        else:
            examples = read_refexp(path, images, benchmark)
        splits.append(Split(benchmark, path, images, sample(examples, limit), len(examples)))
    return splits


def refexp_prompt(expression: str) -> str:
    """The original RefCOCO prompt (`refcoco/cook_data.py`).

    >>> refexp_prompt("man in red shirt")
    '<grounding><phrase>man in red shirt</phrase>'
    """
    return f"<grounding><phrase>{expression}</phrase>"


def flickr_prompt(caption: str, start: int, end: int) -> str:
    """The original Flickr30k Entities prompt for the phrase `caption[start:end]` (`flickr_entities/cook_data.py`).

    >>> flickr_prompt("A man in a blue shirt smiles .", 9, 21)
    '<grounding>A man in  <phrase>a blue shirt</phrase>'
    """
    return f"<grounding>{caption[:start]} <phrase>{caption[start:end]}</phrase>"


def split_name(path: Path) -> str:
    """The split an MDETR file holds, from its name (else the file's stem).

    >>> split_name(Path("finetune_refcoco+_testA.json")), split_name(Path("final_flickr_separateGT_test.json"))
    ('testA', 'test')
    """
    match = re.fullmatch(r"(?:finetune_refcoco[+g]?|final_flickr_(?:separate|merged)GT)_(\w+)\.json", path.name)
    return match.group(1) if match else path.stem


def image_paths(images: Path, file_name: str) -> list[Path]:
    """Where an annotation file's image `file_name` may be under the --images folder, in the order looked at.

    Under COCO 2014's `train2014/` or `val2014/` when the name says which; relative to --images; and relative to
    a folder above it when `file_name` starts with the last folders of --images (so --images names the folder
    that holds the image files as well as the one `file_name` is relative to).

    >>> [str(path) for path in image_paths(Path("data/shapes-eval/images"), "images/000001.png")]
    ['data/shapes-eval/images/images/000001.png', 'data/shapes-eval/images/000001.png']
    >>> [str(path) for path in image_paths(Path("coco2014"), "COCO_train2014_000000000009.jpg")]
    ['coco2014/train2014/COCO_train2014_000000000009.jpg', 'coco2014/COCO_train2014_000000000009.jpg']
    """
    coco = next((folder for folder in ("train2014", "val2014") if folder in file_name), None)
    paths = [images / coco / file_name] if coco else []
    paths.append(images / file_name)
    folders, parts = Path(os.path.abspath(images)).parts, Path(file_name).parts
    paths += [images.joinpath(*parts[depth:]) for depth in range(1, len(parts)) if folders[-depth:] == parts[:depth]]
    return paths


def find_image(images: Path, file_name: str) -> Path:
    """The first of `image_paths` that is a file; else the first of them (the image is then skipped as missing)."""
    paths = image_paths(images, file_name)
    return next((path for path in paths if path.is_file()), paths[0])


def sample(examples: list[Example], limit: int | None) -> list[Example]:
    """A deterministic sample of `limit` examples (seeded, in file order); all of them without a limit."""
    if limit is None or limit >= len(examples):
        return examples
    chosen = sorted(random.Random(SAMPLE_SEED).sample(range(len(examples)), limit))
    return [examples[index] for index in chosen]


def read_refexp(path: Path, images: Path, benchmark: str) -> list[Example]:
    """The expressions of an MDETR RefCOCO/RefCOCO+/RefCOCOg file, in file order."""
    entries, annotations = _coco_parts(path, EXPECTED_REFEXP)
    if entries and ("tokens_positive_eval" in entries[0] or entries[0].get("dataset_name") == "flickr"):
        raise AnnotationFormatError(f"{path} is MDETR's Flickr30k Entities file; score it with --benchmark flickr30k.")
    boxes = _boxes_by_entry(path, annotations, EXPECTED_REFEXP)
    examples = []
    for index, entry in enumerate(entries):
        where = f"{path}: images[{index}]"
        require(isinstance(entry.get("caption"), str) and entry["caption"].strip(),
                 f'{where} has no expression in "caption"; {EXPECTED_REFEXP}.')
        require(isinstance(entry.get("file_name"), str), f'{where} has no "file_name"; {EXPECTED_REFEXP}.')
        found = boxes.get(entry.get("id"), [])
        require(len(found) == 1, f"{where} has {len(found)} annotations, not one; {EXPECTED_REFEXP}.")
        dataset = entry.get("dataset_name", benchmark)
        require(dataset == benchmark, f"{path} holds {dataset} expressions (its dataset_name), not {benchmark}'s; "
                                       f"score it with --benchmark {dataset}.")
        examples.append(Example(
            key=str(entry["id"]), file_name=entry["file_name"], image_path=find_image(images, entry["file_name"]),
            phrase=entry["caption"], prompt=refexp_prompt(entry["caption"]), truth=(xywh_to_xyxy(found[0]["bbox"]),),
        ))
    return examples


def read_flickr(path: Path, images: Path, entities=None) -> list[Example]:
    """The phrases of an MDETR Flickr30k Entities file, one example per phrase, in file order.

    `entities` (a `FlickrEntities`) gives each phrase its boxes and types from the official annotations instead.
    """
    entries, annotations = _coco_parts(path, EXPECTED_FLICKR)
    if entries and "tokens_positive_eval" not in entries[0]:
        if entries[0].get("dataset_name") in REFEXP_BENCHMARKS:
            raise AnnotationFormatError(f"{path} is an MDETR referring-expression file; score it with --benchmark "
                                        f"{entries[0]['dataset_name']}.")
        raise AnnotationFormatError(f'{path}: images[0] has no "tokens_positive_eval"; {EXPECTED_FLICKR}.')
    boxes = _boxes_by_entry(path, annotations, EXPECTED_FLICKR)
    examples = []
    for index, entry in enumerate(entries):
        where = f"{path}: images[{index}]"
        caption, spans = entry.get("caption"), entry.get("tokens_positive_eval")
        require(isinstance(caption, str) and isinstance(entry.get("file_name"), str) and isinstance(spans, list),
                 f'{where} lacks "caption", "file_name" or "tokens_positive_eval"; {EXPECTED_FLICKR}.')
        image_path = find_image(images, entry["file_name"])
        for number, phrase_spans in enumerate(spans):
            start, end = _first_span(phrase_spans, f"{where} tokens_positive_eval[{number}]")
            phrase = caption[start:end]
            if entities is not None:
                truth, types = entities.truth(entry.get("original_img_id"), int(entry.get("sentence_id", -1)), phrase)
            else:
                truth = [xywh_to_xyxy(a["bbox"]) for a in boxes.get(entry.get("id"), [])
                         if [start, end] in [list(span) for span in a.get("tokens_positive", [])]]
                types = ()
            require(bool(truth), f"{where}: phrase {phrase!r} has no annotation whose tokens_positive holds "
                                  f"[{start}, {end}]; {EXPECTED_FLICKR}.")
            examples.append(Example(
                key=f"{entry['id']}:{number}", file_name=entry["file_name"], image_path=image_path,
                phrase=phrase, prompt=flickr_prompt(caption, start, end), truth=tuple(tuple(b) for b in truth),
                types=tuple(types),
            ))
    return examples


def require(condition: bool, message: str) -> None:
    """An AnnotationFormatError saying `message` unless `condition` holds."""
    if not condition:
        raise AnnotationFormatError(message)


def read_coco_file(path: Path, expected: str, parts: tuple[str, ...] = ("images", "annotations")) -> dict:
    """A COCO-style JSON file whose `parts` are lists of objects, or an error naming the expected format."""
    if not path.is_file():
        raise AnnotationFormatError(f"--annotations {path}: no such file.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else f"not JSON: {error.args[0]}"
        raise AnnotationFormatError(f"{path} is {reason}; {expected}.") from None
    named = " and ".join(filter(None, [", ".join(f'"{name}"' for name in parts[:-1]), f'"{parts[-1]}"']))
    require(isinstance(data, dict) and all(isinstance(data.get(name), list) for name in parts),
            f"{path} has no {named} lists; {expected}.")
    require(all(isinstance(item, dict) for name in parts for item in data[name]),
            f"{path}: {named} must hold objects; {expected}.")
    return data


def _coco_parts(path: Path, expected: str) -> tuple[list[dict], list[dict]]:
    """The `images` and `annotations` lists of a COCO-style JSON file, or an error naming the expected format."""
    data = read_coco_file(path, expected)
    require(not data["images"] or "caption" in data["images"][0],
             f'{path}: images[0] has no "caption" (a plain COCO file has none: score one with --benchmark '
             f'detection); {expected}.')
    return data["images"], data["annotations"]


def _boxes_by_entry(path: Path, annotations: list[dict], expected: str) -> dict[object, list[dict]]:
    by_entry: dict[object, list[dict]] = {}
    for index, annotation in enumerate(annotations):
        box = annotation.get("bbox")
        require(isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box),
                 f'{path}: annotations[{index}] has no [x, y, w, h] "bbox"; {expected}.')
        by_entry.setdefault(annotation.get("image_id"), []).append(annotation)
    return by_entry


def _first_span(spans, where: str) -> tuple[int, int]:
    require(isinstance(spans, list) and spans and isinstance(spans[0], list) and len(spans[0]) == 2
             and all(isinstance(v, int) for v in spans[0]),
             f"{where} is not a list of [start, end] spans; {EXPECTED_FLICKR}.")
    return spans[0][0], spans[0][1]
