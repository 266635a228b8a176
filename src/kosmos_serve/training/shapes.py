"""Synthetic scenes of coloured shapes with exact boxes, written as grounded training records.

Each scene is a PNG of 1 to 4 filled shapes on a plain, gradient or noisy neutral background, and
three kinds of record in the format of `kosmos_serve.training.records` (pixel boxes): one grounded
caption ("An image of a red circle and a blue square."), and per object one referring expression
("the red circle") and one region description ("a red circle"). Each object's referring record also
holds its true mask beside its box (`masks`: the pixels of it that show, a later shape hiding what it
covers of an earlier one, as COCO run-length encoding), which `evaluate --segmenter` scores masks against;
the caption and region records, which hold the same boxes, are left as they are. Two objects of the same
colour and shape are told apart by size ("the small red circle") or else by place ("the red circle on the left").
Everything is drawn from `random.Random` and numpy generators seeded per scene, so the same `n` and
`seed` write byte-identical files.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kosmos_serve.exports.masks import encode_mask
from kosmos_serve.grounding import iou

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 75, 215),
    "yellow": (245, 215, 0),
    "orange": (250, 135, 0),
    "purple": (130, 50, 180),
    "pink": (250, 120, 190),
    "brown": (140, 85, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZE_WORDS: tuple[str, str] = ("small", "large")

SIDE_RANGE = (160, 320)  # pixels, each side of a scene
OBJECT_SIZE_RANGE = (0.18, 0.45)  # of the scene's shorter side
MAX_OBJECTS = 4
MAX_IOU = 0.2
PLACEMENT_TRIES = 200
CLEARLY_LARGER = 1.3  # side ratio from which one object is "large" and the other "small"


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape and its tight bounding box in pixels (x2, y2 exclusive)."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return ((x1 + x2) / 2, (y1 + y2) / 2)

    @property
    def side(self) -> int:
        x1, y1, x2, y2 = self.box
        return max(x2 - x1, y2 - y1)


def write_shapes_dataset(out_dir: str | Path, n: int, seed: int) -> Path:
    """Write n scene PNGs under out_dir/images/ and their records to out_dir/records.jsonl; returns its path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        image, objects, masks = draw_scene_with_masks(random.Random(f"shapes:{seed}:{index}"))
        name = f"images/{index:06d}.png"
        image.save(out_dir / name, format="PNG")
        lines += [json.dumps(record) for record in scene_records(name, objects, [encode_mask(m) for m in masks])]
    records_path = out_dir / "records.jsonl"
    records_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="\n")
    return records_path


def draw_scene(rng: random.Random) -> tuple[Image.Image, list[SceneObject]]:
    """A background of random size and 1 to 4 shapes on it whose boxes overlap little."""
    image, objects, _ = draw_scene_with_masks(rng)
    return image, objects


def draw_scene_with_masks(rng: random.Random) -> tuple[Image.Image, list[SceneObject], list[np.ndarray]]:
    """draw_scene's scene (the same for the same rng), and each object's mask: the (height, width) bool array of
    its pixels that show, a later shape hiding what it covers of an earlier one."""
    width, height = rng.randint(*SIDE_RANGE), rng.randint(*SIDE_RANGE)
    image = random_background(rng, width, height)
    objects: list[SceneObject] = []
    masks: list[np.ndarray] = []
    for _ in range(rng.randint(1, MAX_OBJECTS)):
        colour, shape = random_kind(rng, objects)
        placed = place_object(rng, width, height, shape, [o.box for o in objects])
        if placed is None:  # no room left: the scene keeps the objects it has
            break
        mask, box = placed
        image.paste(COLOURS[colour], mask=mask)
        objects.append(SceneObject(colour, shape, box))
        covered = np.asarray(mask) > 0
        masks = [earlier & ~covered for earlier in masks] + [covered]
    return image, objects, masks


def random_kind(rng: random.Random, objects: list[SceneObject]) -> tuple[str, str]:
    """A colour and shape that at most one object already has (words can tell two apart, not three)."""
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if sum((o.colour, o.shape) == (colour, shape) for o in objects) < 2:
            return colour, shape


def random_background(rng: random.Random, width: int, height: int) -> Image.Image:
    """A solid, gradient or lightly noisy neutral background (far from every object colour)."""
    style = rng.choice(("solid", "gradient", "noise"))
    first = neutral_tone(rng, light=rng.random() < 0.6)
    if style == "solid":
        return Image.new("RGB", (width, height), first)
    if style == "gradient":
        second = np.array(neutral_tone(rng, light=rng.random() < 0.6), dtype=np.float64)
        vertical = rng.random() < 0.5
        steps = np.linspace(0.0, 1.0, height if vertical else width)[:, None]
        ramp = np.array(first) * (1 - steps) + second * steps  # one colour per row or column
        pixels = np.broadcast_to(ramp[:, None, :] if vertical else ramp[None, :, :], (height, width, 3))
        return Image.fromarray(np.rint(pixels).astype(np.uint8))
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, 10.0, size=(height, width, 1))
    return Image.fromarray(np.clip(np.rint(np.array(first) + noise), 0, 255).astype(np.uint8))


def neutral_tone(rng: random.Random, *, light: bool) -> tuple[int, int, int]:
    """A light or dark grey with a slight tint: never close to a saturated object colour."""
    level = rng.randint(195, 245) if light else rng.randint(15, 60)
    return tuple(max(0, min(255, level + rng.randint(-10, 10))) for _ in range(3))


def place_object(
    rng: random.Random, width: int, height: int, shape: str, taken: list[tuple[int, int, int, int]]
) -> tuple[Image.Image, tuple[int, int, int, int]] | None:
    """A mask of `shape` drawn at a random size and place, and its tight box; None if no place fits."""
    shorter = min(width, height)
    for _ in range(PLACEMENT_TRIES):
        side = round(rng.uniform(*OBJECT_SIZE_RANGE) * shorter)
        x, y = rng.randint(0, width - side), rng.randint(0, height - side)
        mask = Image.new("L", (width, height), 0)
        draw_shape(ImageDraw.Draw(mask), shape, x, y, side)
        box = mask.getbbox()
        if all(fits_beside(box, other) for other in taken):
            return mask, box
    return None


def fits_beside(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> bool:
    """Boxes may overlap a little (IoU <= 0.2) but neither may cover the other's centre."""
    return iou(box, other) <= MAX_IOU and not contains_centre(box, other) and not contains_centre(other, box)


def contains_centre(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> bool:
    """Whether `box` covers the centre of `other`."""
    cx, cy = (other[0] + other[2]) / 2, (other[1] + other[3]) / 2
    return box[0] <= cx < box[2] and box[1] <= cy < box[3]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, side: int) -> None:
    """Fill `shape` inside the square of `side` pixels whose upper-left corner is (x, y)."""
    last = side - 1  # PIL's coordinates are inclusive
    cx, cy, r = x + last / 2, y + last / 2, last / 2
    if shape == "circle":
        draw.ellipse((x, y, x + last, y + last), fill=255)
    elif shape == "square":
        draw.rectangle((x, y, x + last, y + last), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y), (x + last, y + last), (x, y + last)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y), (x + last, cy), (cx, y + last), (x, cy)], fill=255)
    elif shape == "cross":
        arm = last / 6
        draw.rectangle((x, cy - arm, x + last, cy + arm), fill=255)
        draw.rectangle((cx - arm, y, cx + arm, y + last), fill=255)
    elif shape == "star":
        points = [(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                   cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def describe_objects(objects: list[SceneObject]) -> list[str]:
    """Words naming each object ("red circle"), with size or place words where two look alike."""
    words = []
    for obj in objects:
        twins = [o for o in objects if (o.colour, o.shape) == (obj.colour, obj.shape) and o is not obj]
        name = f"{obj.colour} {obj.shape}"
        if not twins:
            words.append(name)
            continue
        twin = twins[0]
        if max(obj.side, twin.side) >= CLEARLY_LARGER * min(obj.side, twin.side):
            words.append(f"{SIZE_WORDS[obj.side > twin.side]} {name}")
        elif abs(obj.centre[0] - twin.centre[0]) >= abs(obj.centre[1] - twin.centre[1]):
            words.append(f"{name} on the {'left' if obj.centre[0] < twin.centre[0] else 'right'}")
        else:
            words.append(f"{name} at the {'top' if obj.centre[1] < twin.centre[1] else 'bottom'}")
    return words


def with_article(words: str) -> str:
    """The words after "a", or "an" before a vowel: "a red circle", "an orange circle"."""
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def scene_records(image_name: str, objects: list[SceneObject], masks: list[dict] | None = None) -> list[dict]:
    """The caption record (objects left to right), then one referring and one region record per object; with
    `masks` (each object's, in the order of `objects`), each referring record's mask after all else it holds."""
    order = sorted(range(len(objects)), key=lambda i: objects[i].centre[0])
    ordered = [objects[i] for i in order]
    mask_fields = [{"masks": [masks[i]]} if masks is not None else {} for i in order]
    words = describe_objects(ordered)
    phrases = [with_article(w) for w in words]
    caption, spans = "An image of ", []
    for i, (obj, phrase) in enumerate(zip(ordered, phrases)):
        if i > 0:
            caption += " and " if i == len(ordered) - 1 else ", "
        spans.append({"start": len(caption), "end": len(caption) + len(phrase), "boxes": [list(obj.box)]})
        caption += phrase
    records = [{"image": image_name, "caption": caption + ".", "spans": spans}]
    records += [
        {"image": image_name, "task": "referring", "expression": f"the {name}", "boxes": [list(obj.box)], **fields}
        for obj, name, fields in zip(ordered, words, mask_fields)
    ]
    records += [
        {"image": image_name, "task": "region", "boxes": [list(obj.box)], "description": phrase}
        for obj, phrase in zip(ordered, phrases)
    ]
    return records
