"""Lines read (Kosmos-2.5's `ocr`) drawn: each box's polygon outlined, its text written legibly in it, nothing else
touched; results without lines drawn as before."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kosmos_serve.drawing import MIN_LINE_FONT_SIZE, draw_entities, draw_lines, draw_result, line_font_size
from kosmos_serve.grounding import Entity
from kosmos_serve.ocr import parse_reading, resized_size

WIDTH, HEIGHT = 600, 300


def page() -> Image.Image:
    """A white page with two lines of grey 'ink' where the model will say they are."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 40, 400, 70), fill=(200, 200, 200))
    draw.rectangle((40, 150, 560, 200), fill=(200, 200, 200))
    return image


def read_lines():
    """Two lines, from a hand-written reading through the production parser."""
    resized_width, resized_height = resized_size(WIDTH, HEIGHT)
    def box(x1, y1, x2, y2):
        return (f"<bbox><x_{x1 * resized_width // WIDTH}><y_{y1 * resized_height // HEIGHT}>"
                f"<x_{x2 * resized_width // WIDTH}><y_{y2 * resized_height // HEIGHT}></bbox>")
    reading = f"<ocr>{box(40, 40, 400, 70)}RECEIPT 0008\n{box(40, 150, 560, 200)}Total 50,000\n"
    return parse_reading(reading, "<ocr>", WIDTH, HEIGHT).lines


def changed(before: Image.Image, after: Image.Image) -> np.ndarray:
    return np.any(np.asarray(before, dtype=int) != np.asarray(after, dtype=int), axis=-1)


def test_each_lines_polygon_and_text_are_drawn_and_nothing_else():
    image, lines = page(), read_lines()
    drawn = draw_lines(image, lines)
    assert drawn.size == image.size and drawn is not image and changed(image, page()).sum() == 0
    difference = changed(image, drawn)
    pixels = np.asarray(drawn, dtype=int)
    inside = np.zeros_like(difference)
    for line in lines:
        x1, y1, x2, y2 = line.box
        inside[y1 : y2 + 1, x1 : x2 + 1] = True
        for x, y in line.corners:  # the outline passes through every corner
            assert difference[min(y, HEIGHT - 1), min(x, WIDTH - 1)]
        assert difference[y1, (x1 + x2) // 2] and difference[(y1 + y2) // 2, x1]  # and along the sides
        text = pixels[y1 + 3 : y2 - 2, x1 + 3 : x2 - 2].sum(axis=-1) < 150  # black text, legible over the veil
        assert text.sum() > 50
        columns = np.flatnonzero(text.any(axis=0))
        assert columns.max() - columns.min() > (x2 - x1) / 4  # written across the box, not in a corner
    assert not difference[~inside].any()


def test_a_lines_text_fits_its_box():
    assert line_font_size("TOTAL", 400, 50) == 40  # as tall as the box allows
    size = line_font_size("1 BLACK SAKURA 45,455", 120, 50)
    assert MIN_LINE_FONT_SIZE <= size < 40
    assert ImageFont.load_default(size=size).getlength("1 BLACK SAKURA 45,455") <= 120


def test_a_result_without_lines_is_drawn_as_its_entities_are():
    image = page()
    circle = Entity("a circle", (0, 8), ((0.1, 0.1, 0.5, 0.5),), ((60, 30, 300, 150),), (0.9,))
    result = type("Result", (), {"entities": (circle,), "lines": ()})()
    assert np.array_equal(np.asarray(draw_result(image, result)), np.asarray(draw_entities(image, (circle,))))
    with_lines = type("Result", (), {"entities": (circle,), "lines": read_lines()})()
    assert np.array_equal(np.asarray(draw_result(image, with_lines)),
                          np.asarray(draw_lines(draw_entities(image, (circle,)), read_lines())))
