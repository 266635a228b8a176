"""Annotated images: stable colours, boxes where they belong, labels that never collide."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
from PIL import Image, ImageFont

from kosmos_serve.drawing import (
    PALETTE,
    draw_entities,
    entity_colour,
    entity_colours,
    fit_text,
    overlaps,
    place_labels,
)
from kosmos_serve.grounding import Entity

GREY = (128, 128, 128)


def entity(phrase: str, *pixel_boxes: tuple[int, int, int, int]) -> Entity:
    return Entity(
        phrase=phrase, span=(0, 1), boxes=tuple((0.0, 0.0, 1.0, 1.0) for _ in pixel_boxes), pixel_boxes=pixel_boxes
    )


def grey(width: int = 640, height: int = 480) -> Image.Image:
    return Image.new("RGB", (width, height), GREY)


def test_colour_is_stable_and_from_palette():
    assert entity_colour("a snowman") == entity_colour("a snowman")
    assert entity_colour("a snowman") in PALETTE
    assert len({entity_colour(f"phrase {i}") for i in range(200)}) > len(PALETTE) // 2


def test_colour_does_not_depend_on_python_hash_seed():
    code = "from kosmos_serve.drawing import entity_colour; print(entity_colour('a snowman'), hash('a snowman'))"
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.rsplit(" ", 1)
        for seed in ("1", "2")
    ]
    assert outputs[0][1] != outputs[1][1]  # the seeds really changed Python's hash
    assert outputs[0][0] == outputs[1][0] == str(entity_colour("a snowman"))


def test_box_outline_has_entity_colour():
    out = draw_entities(grey(), [entity("a fire", (100, 200, 300, 400))])
    colour = entity_colour("a fire")
    assert out.getpixel((100, 300)) == colour  # left edge, mid-height
    assert out.getpixel((300, 300)) == colour  # right edge
    assert out.getpixel((200, 400)) == colour  # bottom edge
    assert out.getpixel((200, 300)) == GREY  # inside untouched
    assert out.getpixel((50, 300)) == GREY  # outside untouched


def test_all_boxes_of_one_entity_share_its_colour():
    out = draw_entities(grey(), [entity("dogs", (50, 200, 150, 300), (400, 200, 500, 300))])
    assert out.getpixel((50, 250)) == out.getpixel((400, 250)) == entity_colour("dogs")


@pytest.mark.parametrize("size", [(48, 48), (640, 480), (4000, 3000)])
def test_labels_at_the_same_corner_do_not_overlap_and_stay_inside(size):
    width, height = size
    box = (width // 4, height // 4, width * 3 // 4, height * 3 // 4)
    label = (max(10, width // 5), max(8, height // 20))
    rects = place_labels([box, box, (0, 0, 5, 5)], [label, label, label], width, height)
    assert len(rects) == 3
    for x1, y1, x2, y2 in rects:
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    for a, b in itertools.combinations(rects, 2):
        assert not overlaps(a, b), (a, b)


def test_label_sits_just_above_the_box_or_inside_its_top():
    above, inside = place_labels([(100, 200, 300, 400), (100, 0, 300, 400)], [(60, 20), (60, 20)], 640, 480)
    assert above == (100, 180, 160, 200)
    assert inside == (100, 0, 160, 20)  # no room above the second box


def test_many_crowded_labels_do_not_overlap():
    rects = place_labels([(10, 10, 20, 20)] * 30, [(100, 30)] * 30, 640, 480)
    for a, b in itertools.combinations(rects, 2):
        assert not overlaps(a, b)


@pytest.mark.parametrize("size", [(48, 48), (640, 480), (4000, 3000)])
def test_drawn_labels_keep_size_and_input(size):
    image = grey(*size)
    before = image.tobytes()
    w, h = size
    entities = [entity("a snowman", (w // 4, h // 4, w // 2, h // 2)), entity("a fire", (w // 4, h // 4, w // 2, h))]
    out = draw_entities(image, entities)
    assert out.size == image.size and out.mode == "RGB"
    assert image.tobytes() == before
    assert out.tobytes() != before


def test_empty_entities_give_identical_pixels_in_a_copy():
    image = grey()
    out = draw_entities(image, [])
    assert out is not image
    assert out.tobytes() == image.tobytes()


def test_entity_without_boxes_is_skipped():
    assert draw_entities(grey(), [entity("nothing")]).tobytes() == grey().tobytes()


def test_box_outside_image_is_clamped():
    out = draw_entities(
        grey(), [entity("off the edge", (-50, -50, 5000, 5000)), entity("far away", (900, 900, 950, 950))]
    )
    colour = entity_colour("off the edge")
    assert out.getpixel((0, 240)) == colour and out.getpixel((639, 240)) == colour
    assert out.getpixel((320, 479)) == colour


def test_degenerate_box_is_still_drawn():
    out = draw_entities(grey(), [entity("a dot", (300, 300, 300, 300))])
    assert out.getpixel((300, 300)) == entity_colour("a dot")


def test_other_modes_are_converted_to_rgb():
    image = Image.new("L", (200, 100), 128)
    out = draw_entities(image, [entity("a line", (20, 40, 180, 90))])
    assert out.mode == "RGB" and image.mode == "L"
    assert out.getpixel((20, 60)) == entity_colour("a line")


def test_long_phrase_is_truncated_with_ellipsis():
    font = ImageFont.load_default(size=12)
    text = fit_text("a very long phrase " * 20, font, 100)
    assert text.endswith("…") and font.getlength(text) <= 100
    assert fit_text("short", font, 100) == "short"


def test_phrases_of_one_image_get_distinct_colours():
    phrases = [f"thing {n}" for n in range(10)]
    colours = entity_colours(phrases + phrases[:3])
    assert list(colours) == phrases
    assert len(set(colours.values())) == 10
    assert colours["thing 0"] == entity_colour("thing 0")  # the first phrase keeps its own colour
