"""Annotated images: each entity's masks laid over the image translucent, its boxes outlined, in a stable colour of
its own, each box labelled with its phrase; each line read (Kosmos-2.5's `ocr`) outlined, its text written in its box.

PIL only. Rectangles named `Rect` are half-open, `(x1, y1, x2, y2)` with `x2`/`y2` excluded,
so two labels that merely touch do not overlap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

from kosmos_serve.grounding import Entity, PixelBox, TextLine

Rect = tuple[int, int, int, int]
RGB = tuple[int, int, int]

# Saturated, clearly distinct colours (Tableau/Kelly-like); label text is black or white by luminance.
PALETTE: tuple[RGB, ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 200, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 220, 220),
    (240, 50, 230),
    (170, 210, 40),
    (0, 128, 128),
    (154, 99, 36),
    (128, 0, 0),
    (0, 0, 128),
    (255, 105, 180),
    (128, 128, 0),
    (100, 80, 255),
)
ELLIPSIS = "…"
MASK_OPACITY = 0.45  # a mask's colour over the image: the object stays visible under it
MAX_PLACEMENT_ATTEMPTS = 500
LINE_VEIL_OPACITY = 0.75  # white over a line's box, under its text: the reading reads, the page's ink shows faintly
LINE_TEXT_HEIGHT = 0.8  # a line's text fills this share of its box's height, unless its width allows less
MIN_LINE_FONT_SIZE = 9


def entity_colour(phrase: str, taken: Iterable[RGB] = ()) -> RGB:
    """A stable, saturated colour for a phrase (same phrase, same colour, across runs and processes).

    Colours in `taken` are skipped (the next palette entry is used) while the palette lasts.
    """
    digest = hashlib.sha256(phrase.encode("utf-8")).digest()
    start = int.from_bytes(digest[:4], "big")
    used = set(taken)
    candidates = [PALETTE[(start + step) % len(PALETTE)] for step in range(len(PALETTE))]
    return next((colour for colour in candidates if colour not in used), candidates[0])


def entity_colours(phrases: Iterable[str]) -> dict[str, RGB]:
    """One colour per distinct phrase of an image, all different while the palette lasts."""
    colours: dict[str, RGB] = {}
    for phrase in phrases:
        if phrase not in colours:
            colours[phrase] = entity_colour(phrase, colours.values())
    return colours


def text_colour(background: RGB) -> RGB:
    """Black or white, whichever reads better on `background` (ITU-R BT.601 luma).

    >>> text_colour((255, 200, 25)), text_colour((0, 0, 128))
    ((0, 0, 0), (255, 255, 255))
    """
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else (255, 255, 255)


def drawing_scale(width: int, height: int) -> tuple[int, int]:
    """Line width and font size for an image, proportional to its shorter side.

    >>> drawing_scale(64, 64), drawing_scale(640, 480), drawing_scale(4000, 3000)
    ((1, 9), (3, 17), (19, 107))
    """
    side = min(width, height)
    return max(1, round(side / 160)), max(9, round(side / 28))


def clamp_box(box: PixelBox, width: int, height: int) -> PixelBox:
    """`box` ordered and clamped to the image's pixels (inclusive corners, so at least 1 px).

    >>> clamp_box((-10, 50, 700, 20), 640, 480)
    (0, 20, 639, 50)
    """
    x1, x2 = sorted(min(max(x, 0), width - 1) for x in box[0::2])
    y1, y2 = sorted(min(max(y, 0), height - 1) for y in box[1::2])
    return (x1, y1, x2, y2)


def overlaps(a: Rect, b: Rect) -> bool:
    """Whether two half-open rectangles share any pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(boxes: Sequence[PixelBox], sizes: Sequence[tuple[int, int]], width: int, height: int) -> list[Rect]:
    """Label rectangles, one per (box, (w, h)): above the box's top-left, inside the image, clear of each other."""
    placed: list[Rect] = []
    for box, (label_w, label_h) in zip(boxes, sizes, strict=True):
        w, h = min(label_w, width), min(label_h, height)
        x1, y1, x2, _ = clamp_box(box, width, height)
        preferred = (min(max(x1, 0), width - w), y1 - h if y1 - h >= 0 else min(y1, height - h))
        xs = [x1, x2 + 1 - w, 0, width - w, *range(0, width - w + 1, max(1, w // 2))]
        columns = dict.fromkeys(min(max(x, 0), width - w) for x in xs)
        spot = first_clear_spot(columns, preferred[1], w, h, height, placed)
        x, y = spot or preferred  # crowded beyond repair: accept an overlap rather than drop the label
        placed.append((x, y, x + w, y + h))
    return placed


def first_clear_spot(
    xs: Iterable[int], start_y: int, w: int, h: int, height: int, placed: list[Rect]
) -> tuple[int, int] | None:
    """The first (x, y) clear of `placed`: per column, slide down from `start_y`, then from the top."""
    attempts = 0
    for x in xs:
        for y in (start_y, 0):
            while y + h <= height and attempts < MAX_PLACEMENT_ATTEMPTS:
                attempts += 1
                conflict = next((r for r in placed if overlaps((x, y, x + w, y + h), r)), None)
                if conflict is None:
                    return (x, y)
                y = conflict[3]  # every y above the conflict's bottom still hits it
    return None


def fit_text(text: str, font: ImageFont.FreeTypeFont, max_width: int) -> str:
    """`text`, cut and ended with an ellipsis if it is wider than `max_width` pixels."""
    if font.getlength(text) <= max_width:
        return text
    while text and font.getlength(text + ELLIPSIS) > max_width:
        text = text[:-1]
    return text.rstrip() + ELLIPSIS


def overlay_masks(canvas: Image.Image, entities: Sequence[Entity], colours: dict[str, RGB]) -> Image.Image:
    """`canvas` with each entity's masks over it in the entity's colour, at MASK_OPACITY (a later mask over an
    earlier one where they meet); masks of another size than the image are not the image's and are left out."""
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    for entity in entities:
        colour = (*colours[entity.phrase], round(255 * MASK_OPACITY))
        for mask in entity.masks:
            if mask.size == (canvas.height, canvas.width):
                layer.paste(colour, mask=Image.fromarray(mask.to_array()))
    return Image.alpha_composite(canvas.convert("RGBA"), layer).convert("RGB")


def draw_entities(image: Image.Image, entities: Sequence[Entity]) -> Image.Image:
    """A copy of `image` (RGB) with each entity's masks laid over it and its pixel boxes outlined, in its colour, and
    each box labelled with its phrase."""
    canvas = image.convert("RGB")  # always a new image, so the input is never touched
    colours = entity_colours(entity.phrase for entity in entities)
    if any(entity.masks for entity in entities):
        canvas = overlay_masks(canvas, entities, colours)
    width, height = canvas.size
    line_width, font_size = drawing_scale(width, height)
    font = ImageFont.load_default(size=font_size)
    ascent, descent = font.getmetrics()
    pad = max(1, font_size // 5)
    draw = ImageDraw.Draw(canvas)

    boxes: list[PixelBox] = []
    labels: list[tuple[str, RGB]] = []
    for entity in entities:
        colour = colours[entity.phrase]
        text = fit_text(entity.phrase, font, width - 2 * pad)
        for box in entity.pixel_boxes:
            box = clamp_box(box, width, height)
            draw.rectangle(box, outline=colour, width=line_width)
            boxes.append(box)
            labels.append((text, colour))

    # Labels go on after every box, so no outline crosses a label.
    sizes = [(round(font.getlength(text)) + 2 * pad, ascent + descent + 2 * pad) for text, _ in labels]
    for (x1, y1, x2, y2), (text, colour) in zip(place_labels(boxes, sizes, width, height), labels):
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
        draw.text((x1 + pad, y1 + pad), text, font=font, fill=text_colour(colour))
    return canvas


def line_font_size(text: str, width: int, height: int) -> int:
    """The font size at which `text` fills a `width` x `height` box: LINE_TEXT_HEIGHT of its height, smaller when the
    text would be wider than the box, never under MIN_LINE_FONT_SIZE.

    >>> line_font_size("TOTAL", 400, 50), line_font_size("a long line of text in a short box", 60, 50)
    (40, 9)
    """
    size = max(MIN_LINE_FONT_SIZE, int(height * LINE_TEXT_HEIGHT))
    length = ImageFont.load_default(size=size).getlength(text)
    if length > width:
        size = max(MIN_LINE_FONT_SIZE, int(size * width / length))
    return size


def draw_lines(image: Image.Image, lines: Sequence[TextLine]) -> Image.Image:
    """A copy of `image` (RGB) with each line's box, the polygon of its four corners, veiled in white and outlined in a
    colour of its own (the palette in turn, so that neighbours differ), and its text written in black across it."""
    canvas = image.convert("RGBA")
    veil = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    for line in lines:
        ImageDraw.Draw(veil).polygon(line.corners, fill=(255, 255, 255, round(255 * LINE_VEIL_OPACITY)))
    canvas = Image.alpha_composite(canvas, veil).convert("RGB")
    width, height = canvas.size
    line_width = max(1, drawing_scale(width, height)[0] // 2)
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(lines):
        draw.polygon(line.corners, outline=PALETTE[number % len(PALETTE)], width=line_width)
        x1, y1, x2, y2 = clamp_box(line.box, width, height)
        pad = line_width + 1
        room = max(1, x2 - x1 - 2 * pad)
        font = ImageFont.load_default(size=line_font_size(line.text, room, y2 - y1))
        draw.text((x1 + pad, (y1 + y2) / 2), fit_text(line.text, font, room), font=font, fill=(0, 0, 0), anchor="lm")
    return canvas


def draw_result(image: Image.Image, result) -> Image.Image:
    """A copy of `image` with what a result (an engine `Result`, or any with `entities` and `lines`) found on it: its
    entities (`draw_entities`) and the lines it read (`draw_lines`)."""
    drawn = draw_entities(image, result.entities)
    return draw_lines(drawn, result.lines) if result.lines else drawn
