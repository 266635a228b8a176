"""The annotated image: each entity's boxes in a stable colour of its own, labelled with its phrase.

PIL only. Line width and text size follow the image size; labels sit above their box (inside it
when there is no room), stay inside the image and are moved until they overlap no other label.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from kosmos_serve.grounding import Entity

Rectangle = tuple[int, int, int, int]

PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (255, 225, 25),
    (128, 0, 0), (0, 0, 128), (128, 128, 0), (255, 215, 180),
]


def entity_colour(phrase: str, taken: Sequence[tuple[int, int, int]] = ()) -> tuple[int, int, int]:
    """A stable colour for a phrase (same phrase, same colour, in every process), avoiding `taken` ones."""
    start = hashlib.sha256(phrase.strip().lower().encode()).digest()[0]
    for step in range(len(PALETTE)):
        colour = PALETTE[(start + step) % len(PALETTE)]
        if colour not in taken:
            return colour
    return PALETTE[start % len(PALETTE)]


def entity_colours(phrases: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """One distinct colour per phrase of an image (while the palette lasts)."""
    colours: dict[str, tuple[int, int, int]] = {}
    for phrase in phrases:
        if phrase not in colours:
            colours[phrase] = entity_colour(phrase, list(colours.values()))
    return colours


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else (255, 255, 255)


def overlaps(a: Rectangle, b: Rectangle) -> bool:
    """Whether two (x1, y1, x2, y2) rectangles share any area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_label(box: Rectangle, size: tuple[int, int], image_size: tuple[int, int],
                placed: Sequence[Rectangle]) -> Rectangle:
    """Where a label of `size` goes for `box`: above it, else inside its top, then shifted clear of `placed`."""
    width, height = min(size[0], image_size[0]), max(size[1], 1)
    x = min(max(box[0], 0), image_size[0] - width)
    preferred = box[1] - height if box[1] >= height else box[1]
    rows = image_size[1] // height + 1
    offsets = [0] + [sign * step * height for step in range(1, rows) for sign in (1, -1)]
    tops = [min(max(preferred + offset, 0), max(image_size[1] - height, 0)) for offset in offsets]
    labels = [(x, top, x + width, top + height) for top in tops]
    return next((label for label in labels if not any(overlaps(label, other) for other in placed)), labels[0])


def draw_entities(image: Image.Image, entities: Sequence[Entity]) -> Image.Image:
    """A copy of `image` (RGB) with each entity's pixel boxes outlined in its colour and labelled with its phrase."""
    canvas = image.convert("RGB")
    if canvas is image:
        canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    shorter = min(canvas.size)
    line = max(2, shorter // 150)
    font = ImageFont.load_default(size=max(11, shorter // 32))
    padding = max(2, line)
    placed: list[Rectangle] = []
    colours = entity_colours([entity.phrase for entity in entities])
    for entity in entities:
        colour = colours[entity.phrase]
        for x1, y1, x2, y2 in entity.pixel_boxes:
            box = _clamp((x1, y1, x2, y2), canvas.size)
            draw.rectangle(box, outline=colour, width=line)
            text = _fit(draw, entity.phrase, font, canvas.width - 2 * padding)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            label = place_label(box, (right - left + 2 * padding, bottom - top + 2 * padding), canvas.size, placed)
            placed.append(label)
            draw.rectangle(label, fill=colour)
            draw.text((label[0] + padding - left, label[1] + padding - top), text, fill=text_colour(colour), font=font)
    return canvas


def _clamp(box: Rectangle, size: tuple[int, int]) -> Rectangle:
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, x2 = sorted((min(max(x1, 0), size[0] - 1), min(max(x2, 0), size[0] - 1)))
    y1, y2 = sorted((min(max(y1, 0), size[1] - 1), min(max(y2, 0), size[1] - 1)))
    return (x1, y1, max(x2, x1 + 1), max(y2, y1 + 1))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    """`text`, cut with an ellipsis until it fits `max_width` pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=font) > max_width:
        text = text[:-1]
    return text + "…"
