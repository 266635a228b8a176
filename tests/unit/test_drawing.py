"""The annotated image: colours, boxes, labels that stay apart and inside."""

import itertools
import subprocess
import sys

import pytest
from PIL import Image

from kosmos_serve.drawing import draw_entities, entity_colour, entity_colours, overlaps, place_label
from kosmos_serve.grounding import Entity


def entity(phrase, *boxes):
    return Entity(phrase=phrase, span=(0, len(phrase)), boxes=(), pixel_boxes=tuple(boxes))


def test_colour_is_stable_across_processes():
    code = "from kosmos_serve.drawing import entity_colour; print(entity_colour('a snowman'))"
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {str(entity_colour("a snowman"))}


def test_phrases_of_one_image_get_distinct_colours():
    phrases = [f"thing {n}" for n in range(10)]
    colours = entity_colours(phrases + phrases[:3])
    assert len(set(colours.values())) == 10


def test_box_outline_has_the_entity_colour():
    image = Image.new("RGB", (640, 480), (128, 128, 128))
    drawn = draw_entities(image, [entity("a fire", (100, 200, 300, 400))])
    colour = entity_colours(["a fire"])["a fire"]
    assert drawn.getpixel((100, 300)) == colour  # left edge, mid-height
    assert drawn.getpixel((200, 300)) == (128, 128, 128)  # inside is untouched
    assert image.getpixel((100, 300)) == (128, 128, 128)  # input not mutated
    assert drawn.size == image.size


@pytest.mark.parametrize("size", [(48, 48), (640, 480), (4000, 3000)])
def test_labels_never_overlap_and_stay_inside(size):
    width, height = size
    boxes = [(0, 0, width // 2, height // 2), (1, 1, width // 2, height // 3), (0, 2, width // 3, height // 2)]
    placed = []
    for box in boxes:
        label = place_label(box, (width // 3, max(8, height // 12)), size, placed)
        placed.append(label)
    for a, b in itertools.combinations(placed, 2):
        assert not overlaps(a, b)
    for x1, y1, x2, y2 in placed:
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


def test_no_entities_gives_identical_pixels_and_boxes_outside_are_clamped():
    image = Image.effect_mandelbrot((64, 48), (-2, -1.5, 1, 1.5), 20).convert("RGB")
    assert draw_entities(image, []).tobytes() == image.tobytes()
    drawn = draw_entities(image, [entity("far away", (-50, -50, 500, 500))])
    assert drawn.size == (64, 48) and drawn.tobytes() != image.tobytes()


def test_other_modes_are_drawn_in_rgb():
    drawn = draw_entities(Image.new("L", (100, 100), 200), [entity("a", (10, 10, 50, 50))])
    assert drawn.mode == "RGB"
