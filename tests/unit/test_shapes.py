"""Synthetic shape scenes: deterministic, readable as records, and boxes that match the drawings."""

import itertools
import json
import math
import random

import numpy as np
import pytest
from PIL import Image

from kosmos_serve.training.records import read_examples
from kosmos_serve.training.shapes import (
    COLOURS,
    SHAPES,
    SceneObject,
    describe_objects,
    draw_scene,
    draw_scene_with_masks,
    scene_records,
    write_shapes_dataset,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 scenes (seed 0) and their records, read back as JSON."""
    path = write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 40, seed=0)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return path, records


def colour_and_shape(words: str) -> tuple[str, str]:
    """The colour and shape named in words like "a small red circle" or "the red circle on the left"."""
    tokens = words.split()
    return next(t for t in tokens if t in COLOURS), next(t for t in tokens if t in SHAPES)


def test_same_seed_writes_identical_bytes_and_another_seed_differs(tmp_path):
    first = write_shapes_dataset(tmp_path / "a", 6, seed=3)
    second = write_shapes_dataset(tmp_path / "b", 6, seed=3)
    other = write_shapes_dataset(tmp_path / "c", 6, seed=4)
    assert first.read_bytes() == second.read_bytes()
    for name in ("000000.png", "000005.png"):
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()
        assert (tmp_path / "a/images" / name).read_bytes() != (tmp_path / "c/images" / name).read_bytes()
    assert first.read_bytes() != other.read_bytes()


def test_every_record_reads_back_as_examples(dataset):
    path, records = dataset
    examples = read_examples(path)
    assert len(examples) == len(records)
    scenes = {r["image"] for r in records}
    objects = sum(1 for r in records if r.get("task") == "region")
    assert [e.kind for e in examples].count("caption") == len(scenes) == 40
    assert [e.kind for e in examples].count("referring") == objects
    assert all(e.image_path.is_file() for e in examples)


def test_caption_spans_are_the_object_phrases_with_their_boxes(dataset):
    _, records = dataset
    for image in {r["image"] for r in records}:
        scene = [r for r in records if r["image"] == image]
        caption = next(r for r in scene if "caption" in r)
        regions = {tuple(r["boxes"][0]): r["description"] for r in scene if r.get("task") == "region"}
        text = caption["caption"]
        assert text.startswith("An image of ") and text.endswith(".")
        phrases = [text[s["start"] : s["end"]] for s in caption["spans"]]
        assert phrases == [regions[tuple(s["boxes"][0])] for s in caption["spans"]]
        assert len(phrases) == len(regions)
        centres_x = [(s["boxes"][0][0] + s["boxes"][0][2]) / 2 for s in caption["spans"]]
        assert centres_x == sorted(centres_x)  # left to right


def test_referring_expressions_are_unique_within_a_scene(dataset):
    _, records = dataset
    for image in {r["image"] for r in records}:
        scene = [r for r in records if r["image"] == image]
        expressions = [r["expression"] for r in scene if r.get("task") == "referring"]
        assert len(expressions) == len(set(expressions))
        assert all(e.startswith("the ") for e in expressions)


def test_boxes_lie_inside_their_images_and_scenes_have_one_to_four_objects(dataset):
    path, records = dataset
    counts = set()
    for record in records:
        width, height = Image.open(path.parent / record["image"]).size
        assert 160 <= width <= 320 and 160 <= height <= 320
        boxes = [b for s in record.get("spans", []) for b in s["boxes"]] + record.get("boxes", [])
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert 0.18 * min(width, height) - 1 <= max(x2 - x1, y2 - y1) <= 0.45 * min(width, height) + 1
        if "caption" in record:
            counts.add(len(record["spans"]))
    assert counts == {1, 2, 3, 4}


def test_circles_and_squares_have_their_colour_at_their_box_centre(dataset):
    path, records = dataset
    checked = 0
    for record in records:
        colour, shape = colour_and_shape(record.get("description", "a red star"))
        if record.get("task") != "region" or shape not in ("circle", "square"):
            continue
        x1, y1, x2, y2 = record["boxes"][0]
        image = Image.open(path.parent / record["image"]).convert("RGB")
        assert image.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == COLOURS[colour]
        if shape == "square":  # a square fills its box, corners included, unless another shape covers them
            assert COLOURS[colour] in {image.getpixel((x, y)) for x in (x1, x2 - 1) for y in (y1, y2 - 1)}
        else:  # a circle leaves its box's corners to the background
            assert image.getpixel((x1, y1)) != COLOURS[colour]
        checked += 1
    assert checked >= 10


def test_object_colours_are_far_apart():
    for (name_a, a), (name_b, b) in itertools.combinations(COLOURS.items(), 2):
        assert math.dist(a, b) > 75, (name_a, name_b)


def test_look_alike_objects_are_told_apart_by_size_then_by_place():
    def red_circle(box):
        return SceneObject("red", "circle", box)

    small, large = red_circle((0, 0, 40, 40)), red_circle((100, 0, 180, 80))
    assert describe_objects([small, large]) == ["small red circle", "large red circle"]
    left, right = red_circle((0, 0, 40, 40)), red_circle((100, 10, 142, 52))  # sizes too close to tell
    assert describe_objects([right, left]) == ["red circle on the right", "red circle on the left"]
    top, bottom = red_circle((0, 0, 40, 40)), red_circle((10, 100, 52, 142))
    assert describe_objects([top, bottom]) == ["red circle at the top", "red circle at the bottom"]
    blue = SceneObject("blue", "circle", (50, 50, 60, 60))
    assert describe_objects([small, blue]) == ["red circle", "blue circle"]


def test_scene_records_of_a_worked_example():
    objects = [
        SceneObject("blue", "square", (150, 10, 200, 60)),
        SceneObject("red", "circle", (10, 10, 60, 60)),
        SceneObject("orange", "star", (80, 90, 140, 150)),
    ]
    caption, *rest = scene_records("images/000000.png", objects)
    assert caption == {
        "image": "images/000000.png",
        "caption": "An image of a red circle, an orange star and a blue square.",
        "spans": [
            {"start": 12, "end": 24, "boxes": [[10, 10, 60, 60]]},
            {"start": 26, "end": 40, "boxes": [[80, 90, 140, 150]]},
            {"start": 45, "end": 58, "boxes": [[150, 10, 200, 60]]},
        ],
    }
    assert [r.get("expression") or r.get("description") for r in rest] == [
        "the red circle",
        "the orange star",
        "the blue square",
        "a red circle",
        "an orange star",
        "a blue square",
    ]
    assert [r["task"] for r in rest] == ["referring"] * 3 + ["region"] * 3
    single = scene_records("x.png", objects[1:2])[0]
    assert single["caption"] == "An image of a red circle."


def test_masks_are_exactly_the_pixels_of_each_colour_and_the_scene_is_draw_scenes():
    """Object colours never occur in backgrounds, so a colour's pixels are the union of its objects' masks."""
    same_colour_twins = 0
    for index in range(30):
        image, objects, masks = draw_scene_with_masks(random.Random(f"shapes:0:{index}"))
        plain_image, plain_objects = draw_scene(random.Random(f"shapes:0:{index}"))
        assert image.tobytes() == plain_image.tobytes() and objects == plain_objects
        pixels = np.asarray(image)
        assert len(masks) == len(objects)
        for obj, mask in zip(objects, masks):
            assert mask.shape == pixels.shape[:2] and mask.any()
            assert _inside(Image.fromarray(mask).getbbox(), obj.box)
        assert sum(mask.astype(int) for mask in masks).max() == 1  # no pixel shows two objects
        for colour in {obj.colour for obj in objects}:
            drawn = np.all(pixels == COLOURS[colour], axis=-1)
            of_colour = [mask for obj, mask in zip(objects, masks) if obj.colour == colour]
            same_colour_twins += len(of_colour) > 1
            assert np.array_equal(drawn, np.logical_or.reduce(of_colour))
    assert same_colour_twins >= 1  # the union above was put to the test at least once


def _inside(inner: tuple[int, int, int, int], outer: tuple[int, int, int, int]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]
