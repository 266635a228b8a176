"""The synthetic shapes scenes written as the benchmarks' files, so every benchmark runs offline on the demo model.

From a folder of `kosmos_serve.training.shapes` (`images/`, `records.jsonl`) this writes, under `mdetr/`:
- `finetune_refcoco_synthetic.json`: one MDETR referring-expression entry per referring record ("the red circle");
- `final_flickr_separateGT_synthetic.json`: one MDETR Flickr30k entry per scene, its caption written Flickr-style
  (punctuation as words: "An image of a red circle , a blue square and a yellow star ."), each object a phrase;
- `flickr30k_entities/`: the same captions and boxes as the official Flickr30k Entities files (`Sentences/<id>.txt`,
  `Annotations/<id>.xml`), each phrase typed by its shape, so per-type recall can be shown;
and under `coco/`, for `--benchmark detection`:
- `instances_synthetic.json`: COCO ground truth whose categories are class phrases, as an ontology names them:
  one per kind of object (colour and shape, "a red circle"; two red circles are two boxes of it), and per scene
  `--absent` phrases of kinds not in it ("a green star"), drawn with the seed and the scene's number, listed in the
  image's `neg_category_ids` (LVIS's field), so each scene is asked for its own kinds and those absent ones; each
  object's annotation has its true mask as `segmentation` (COCO run-length encoding, from the records' `masks`),
  which `evaluate --segmenter` scores masks against.

    python -m kosmos_serve.evaluation.synthetic data/shapes-eval --n 200 --seed 2
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from xml.etree import ElementTree as ET

from PIL import Image

from kosmos_serve.training.shapes import COLOURS, SHAPES, write_shapes_dataset

REFCOCO_FILE = "finetune_refcoco_synthetic.json"
FLICKR_FILE = "final_flickr_separateGT_synthetic.json"
ENTITIES_FOLDER = "flickr30k_entities"
DETECTION_FILE = "instances_synthetic.json"
ABSENT_PER_SCENE = 4


def flickr_style(caption: str, spans: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The caption with punctuation as separate words, and each span moved onto the same words.

    >>> flickr_style("An image of a red circle, a star.", [{"start": 12, "end": 24}, {"start": 26, "end": 32}])
    ('An image of a red circle , a star .', [(12, 24), (27, 33)])
    """
    styled = re.sub(r"\s*([,.])", r" \1", caption)
    moved, cursor = [], 0
    for span in spans:
        start = styled.index(caption[span["start"] : span["end"]], cursor)
        cursor = start + span["end"] - span["start"]
        moved.append((start, cursor))
    return styled, moved


def shape_of(phrase: str) -> str:
    """The shape a phrase names: its entity type here (as "people" or "animals" are Flickr30k's).

    >>> shape_of("a small red circle on the left")
    'circle'
    """
    return next(word for word in phrase.split() if word in SHAPES)


def write_mdetr_files(shapes_dir: Path) -> dict[str, Path]:
    """Write the benchmark files of a shapes folder under `shapes_dir/mdetr/`; returns their paths by name."""
    shapes_dir = Path(shapes_dir)
    records = [json.loads(line) for line in (shapes_dir / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    out = shapes_dir / "mdetr"
    for folder in ("Sentences", "Annotations"):
        (out / ENTITIES_FOLDER / folder).mkdir(parents=True, exist_ok=True)
    sizes = {}
    refcoco, flickr = _coco(), _coco()
    for record in records:
        name = record["image"]
        if name not in sizes:
            with Image.open(shapes_dir / name) as image:
                sizes[name] = image.size
        width, height = sizes[name]
        scene = int(Path(name).stem)
        if record.get("task") == "referring":
            number = len(refcoco["images"])
            expression, box = record["expression"], record["boxes"][0]
            refcoco["images"].append({
                "file_name": name, "height": height, "width": width, "id": number, "original_id": scene,
                "caption": expression, "dataset_name": "refcoco", "tokens_negative": []})
            refcoco["annotations"].append(_annotation(number, number, box, [[0, len(expression)]]))
        elif "caption" in record:
            number = len(flickr["images"])
            caption, spans = flickr_style(record["caption"], record["spans"])
            flickr["images"].append({
                "file_name": name, "height": str(height), "width": str(width), "id": number, "caption": caption,
                "dataset_name": "flickr", "tokens_negative": [[0, len(caption)]], "sentence_id": 0,
                "original_img_id": scene, "tokens_positive_eval": [[list(span)] for span in spans]})
            for span, original in zip(spans, record["spans"]):
                for box in original["boxes"]:
                    flickr["annotations"].append(
                        _annotation(len(flickr["annotations"]), number, box, [list(span)]))
            _write_entities(out / ENTITIES_FOLDER, scene, name, (width, height), caption, spans, record["spans"])
    paths = {"refcoco": out / REFCOCO_FILE, "flickr30k": out / FLICKR_FILE, "flickr_entities": out / ENTITIES_FOLDER}
    paths["refcoco"].write_text(json.dumps(refcoco), encoding="utf-8")
    paths["flickr30k"].write_text(json.dumps(flickr), encoding="utf-8")
    return paths


def absent_phrases(objects: list[tuple[str, str]], count: int, seed: int, scene: int) -> list[str]:
    """`count` phrases of kinds (colour, shape) none of a scene's objects is, the same for the same seed and scene.

    >>> absent_phrases([("red", "circle")], 2, seed=2, scene=0) == absent_phrases([("red", "circle")], 2, 2, 0)
    True
    >>> any("red circle" in phrase for phrase in absent_phrases([("red", "circle")], 47, seed=2, scene=0))
    False
    """
    kinds = [(colour, shape) for colour in COLOURS for shape in SHAPES if (colour, shape) not in objects]
    chosen = random.Random(f"absent:{seed}:{scene}").sample(kinds, min(count, len(kinds)))
    return [class_phrase(colour, shape) for colour, shape in chosen]


def class_phrase(colour: str, shape: str) -> str:
    """The phrase an ontology gives a kind of object, as the scenes' region descriptions word it.

    >>> class_phrase("orange", "star")
    'a orange star'
    """
    return f"a {colour} {shape}"


def write_detection_file(shapes_dir: Path, absent: int = ABSENT_PER_SCENE, seed: int = 2) -> Path:
    """Write `shapes_dir/coco/instances_synthetic.json` (categories: phrases; each scene's present and `absent`
    absent ones); returns its path."""
    shapes_dir = Path(shapes_dir)
    records = [json.loads(line) for line in (shapes_dir / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    scenes: dict[str, list[tuple[str, list[int], dict | None]]] = {}  # image -> its objects' phrases, boxes, masks
    negatives = {}
    for record in records:
        objects = scenes.setdefault(record["image"], [])
        if record.get("task") == "referring":  # one per object: "the small red circle" -> (red, circle)
            words = record["expression"].split()
            kind = next(w for w in words if w in COLOURS), next(w for w in words if w in SHAPES)
            objects.append((class_phrase(*kind), record["boxes"][0], record.get("masks", [None])[0]))
    for name, objects in scenes.items():
        kinds = [tuple(phrase.split()[1:]) for phrase, _, _ in objects]
        negatives[name] = absent_phrases(kinds, absent, seed, int(Path(name).stem))
    phrases = sorted({phrase for objects in scenes.values() for phrase, _, _ in objects}
                     | {phrase for chosen in negatives.values() for phrase in chosen})
    ids = {phrase: number for number, phrase in enumerate(phrases, start=1)}
    truth = {"info": {"description": f"synthetic shapes scenes, {absent} absent phrases per scene (seed {seed})"},
             "images": [], "annotations": [],
             "categories": [{"id": ids[phrase], "name": phrase, "supercategory": "shape"} for phrase in phrases]}
    for name, objects in scenes.items():
        with Image.open(shapes_dir / name) as image:
            width, height = image.size
        scene = int(Path(name).stem)
        truth["images"].append({"id": scene, "file_name": name, "width": width, "height": height,
                                "neg_category_ids": [ids[phrase] for phrase in negatives[name]]})
        for phrase, (x1, y1, x2, y2), mask in objects:
            truth["annotations"].append({"id": len(truth["annotations"]) + 1, "image_id": scene,
                                         "category_id": ids[phrase], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                         "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                                         **({"segmentation": mask} if mask is not None else {})})
    path = shapes_dir / "coco" / DETECTION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(truth), encoding="utf-8")
    return path


def _coco() -> dict:
    return {"info": {}, "licenses": [], "images": [], "annotations": [],
            "categories": [{"supercategory": "object", "id": 1, "name": "object"}]}


def _annotation(number: int, entry: int, box: list[int], tokens_positive: list[list[int]]) -> dict:
    x1, y1, x2, y2 = box
    return {"area": (x2 - x1) * (y2 - y1), "iscrowd": 0, "image_id": entry, "category_id": 1, "id": number,
            "bbox": [x1, y1, x2 - x1, y2 - y1], "tokens_positive": tokens_positive}


def _write_entities(folder: Path, scene: int, name: str, size: tuple[int, int], caption: str,
                    spans: list[tuple[int, int]], original: list[dict]) -> None:
    """The scene's caption and boxes in the official Flickr30k Entities formats (phrase ids 1, 2, ...)."""
    pieces, cursor = [], 0
    for number, (start, end) in enumerate(spans, start=1):
        phrase = caption[start:end]
        pieces += [caption[cursor:start], f"[/EN#{number}/{shape_of(phrase)} {phrase}]"]
        cursor = end
    (folder / "Sentences" / f"{scene}.txt").write_text("".join(pieces) + caption[cursor:] + "\n", encoding="utf-8")
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = name
    size_element = ET.SubElement(root, "size")
    for tag, value in (("width", size[0]), ("height", size[1]), ("depth", 3)):
        ET.SubElement(size_element, tag).text = str(value)
    for number, span in enumerate(original, start=1):
        for box in span["boxes"]:
            element = ET.SubElement(root, "object")
            ET.SubElement(element, "name").text = str(number)
            corners = ET.SubElement(element, "bndbox")
            for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
                ET.SubElement(corners, tag).text = str(value)
    ET.ElementTree(root).write(folder / "Annotations" / f"{scene}.xml", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Write synthetic scenes (unless the folder has them) and their benchmark files; print the files' paths."""
    parser = argparse.ArgumentParser(prog="python -m kosmos_serve.evaluation.synthetic",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--n", type=int, default=200, help="scenes to write when the folder has none (default 200)")
    parser.add_argument("--seed", type=int, default=2, help="their seed (default 2: the demo model's held-out scenes); "
                                                             "also draws the absent phrases")
    parser.add_argument("--absent", type=int, default=ABSENT_PER_SCENE,
                        help=f"absent phrases per scene in the detection file (default {ABSENT_PER_SCENE})")
    args = parser.parse_args(argv)
    if not (args.folder / "records.jsonl").is_file():
        write_shapes_dataset(args.folder, args.n, args.seed)
    for name, path in write_mdetr_files(args.folder).items():
        print(f"{name}: {path}")
    print(f"detection: {write_detection_file(args.folder, args.absent, args.seed)}")


if __name__ == "__main__":
    main()
