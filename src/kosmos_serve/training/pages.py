"""Synthetic pages of rendered text with every line's text and box: OCR ground truth made here, for scoring and
training Kosmos-2.5's reading offline.

Each page is a PNG of lines of words from a fixed vocabulary (`VOCABULARY`), in one of the DejaVu fonts shipped in
`fonts/` (with their license) at one of a few sizes, dark ink on a plain light background: one column of lines of
varied lengths, or two columns. Pages vary in size. `pages.jsonl` holds one record per page, in the format
`kosmos-serve evaluate --benchmark ocr` reads (`kosmos_serve.evaluation.ocr_pages`):

    {"image": "images/000000.png", "width": 612, "height": 344, "font": "DejaVuSerif", "font_size": 22,
     "columns": 1, "lines": [{"text": "river 25 open", "box": [31, 27, 187, 49],
                              "corners": [[31, 27], [187, 27], [187, 49], [31, 49]]}, ...]}

Lines are listed in reading order (a column top to bottom, the left column first). A line's box is the tight
rectangle of its ink in the image's pixels, x2 and y2 exclusive; its corners go clockwise from the top left.
Text is drawn with Pillow's basic layout from the shipped fonts (no system font, no libraqm), every choice from a
`random.Random` seeded per page, so the same `n` and `seed` write byte-identical files wherever the same Pillow runs.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONTS_DIR = Path(__file__).with_name("fonts")
FONTS = ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono")
VOCABULARY = (
    "the", "and", "for", "with", "from", "into", "over", "under", "after", "before", "about", "near",
    "page", "line", "word", "text", "book", "letter", "note", "paper", "table", "chart", "report", "figure",
    "river", "stone", "field", "garden", "forest", "island", "valley", "harbor", "bridge", "market", "village",
    "window", "door", "house", "school", "station", "office", "kitchen", "library", "museum", "theater",
    "red", "blue", "green", "yellow", "bright", "quiet", "small", "large", "early", "late", "open", "closed",
    "north", "south", "east", "west", "summer", "winter", "morning", "evening", "monday", "friday",
    "read", "write", "walk", "carry", "build", "follow", "gather", "listen", "travel", "answer", "count", "learn",
    "price", "total", "number", "order", "invoice", "amount", "date", "name", "address", "item",
    "0", "1", "2", "7", "12", "25", "40", "64", "100", "365", "2024",
)
@dataclass(frozen=True)
class PageStyle:
    """How pages are set: every range is inclusive, every share a probability."""

    font_sizes: tuple[int, ...] = (14, 18, 22, 26, 30)  # pixels per em
    width_ems: tuple[int, int] = (10, 36)  # a column's width, in ems of its font
    max_width: int = 1024  # pixels: a wider column is narrowed to fit
    margin_range: tuple[int, int] = (12, 48)  # pixels around the text
    lines_range: tuple[int, int] = (3, 12)  # lines of a one-column page
    column_lines_range: tuple[int, int] = (2, 8)  # lines of each column of a two-column page
    line_spacing: tuple[float, float] = (1.2, 1.8)  # a line's pitch, in line heights (ascent + descent)
    gutter_ems: tuple[int, int] = (2, 4)  # between two columns
    two_columns_share: float = 0.3  # of pages
    full_line_share: float = 0.5  # of lines, filled to the column's width; the others end at 30-100% of it
    ragged_range: tuple[float, float] = (0.3, 1.0)
    canvas: tuple[int, int] | None = None  # every page this size (the text fits inside), else each page its own


DOCUMENT_STYLE = PageStyle()  # `data pages`: documents of up to 12 lines a column, up to 1024 px wide

PAGES_FILE = "pages.jsonl"


@dataclass(frozen=True)
class PageLine:
    """One line drawn on a page: its text and the tight box of its ink (x2, y2 exclusive)."""

    text: str
    box: tuple[int, int, int, int]

    def to_dict(self) -> dict:
        """The line as its ground-truth record: text, box and the box's corners clockwise from the top left.

        >>> PageLine("open door", (10, 20, 90, 41)).to_dict()
        {'text': 'open door', 'box': [10, 20, 90, 41], 'corners': [[10, 20], [90, 20], [90, 41], [10, 41]]}
        """
        x1, y1, x2, y2 = self.box
        return {"text": self.text, "box": [x1, y1, x2, y2], "corners": [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]}


@dataclass(frozen=True)
class Page:
    """A rendered page, its lines in reading order, and how it was set."""

    image: Image.Image
    lines: tuple[PageLine, ...]
    font: str
    font_size: int
    columns: int


def write_pages_dataset(out_dir: str | Path, n: int, seed: int, style: PageStyle = DOCUMENT_STYLE) -> Path:
    """Write n page PNGs under out_dir/images/ and their records to out_dir/pages.jsonl; returns its path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(n):
        page = draw_page(random.Random(f"pages:{seed}:{index}"), style)
        name = f"images/{index:06d}.png"
        page.image.save(out_dir / name, format="PNG")
        records.append(page_record(name, page))
    path = out_dir / PAGES_FILE
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8", newline="\n")
    return path


def page_record(name: str, page: Page) -> dict:
    """A page's ground-truth record: the image's name and size, how it was set, and its lines."""
    width, height = page.image.size
    return {"image": name, "width": width, "height": height, "font": page.font, "font_size": page.font_size,
            "columns": page.columns, "lines": [line.to_dict() for line in page.lines]}


def draw_page(rng: random.Random, style: PageStyle = DOCUMENT_STYLE) -> Page:
    """A page of one or two columns of lines, in one font and size, on a plain light background."""
    font_name, size = rng.choice(FONTS), rng.choice(style.font_sizes)
    font = load_font(font_name, size)
    ascent, descent = font.getmetrics()
    columns = 2 if rng.random() < style.two_columns_share else 1
    margin = rng.randint(*style.margin_range)
    gutter = rng.randint(*style.gutter_ems) * size if columns == 2 else 0
    widest = (style.max_width - 2 * margin - gutter) // columns
    column_width = min(rng.randint(*style.width_ems) * size, widest)
    pitch = round((ascent + descent) * rng.uniform(*style.line_spacing))
    counts = [rng.randint(*(style.column_lines_range if columns == 2 else style.lines_range)) for _ in range(columns)]
    width = 2 * margin + columns * column_width + gutter
    height = 2 * margin + max(counts) * pitch
    if style.canvas is not None:
        if width > style.canvas[0] or height > style.canvas[1]:
            raise ValueError(f"A {width} x {height} page of this style does not fit its {style.canvas} canvas.")
        width, height = style.canvas
    image = Image.new("RGB", (width, height), light_tone(rng))
    ink = dark_tone(rng)
    lines = []
    for column, count in enumerate(counts):
        x = margin + column * (column_width + gutter)
        for row in range(count):
            text = line_of_words(rng, font, column_width, style)
            lines.append(draw_line(image, text, (x, margin + row * pitch), font, ink))
    return Page(image, tuple(lines), font_name, size, columns)


@functools.cache
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A shipped font at `size` pixels per em, laid out by Pillow's basic engine (the same wherever Pillow runs)."""
    return ImageFont.truetype(str(FONTS_DIR / f"{name}.ttf"), size, layout_engine=ImageFont.Layout.BASIC)


def line_of_words(rng: random.Random, font: ImageFont.FreeTypeFont, column_width: int, style: PageStyle) -> str:
    """Words from the vocabulary, as many as fit in the line's length: the column's width, or part of it."""
    share = 1.0 if rng.random() < style.full_line_share else rng.uniform(*style.ragged_range)
    words = [rng.choice(VOCABULARY)]
    while True:
        longer = " ".join([*words, rng.choice(VOCABULARY)])
        if font.getlength(longer) > share * column_width:
            return " ".join(words)
        words = longer.split(" ")


def draw_line(image: Image.Image, text: str, origin: tuple[int, int], font: ImageFont.FreeTypeFont,
              ink: tuple[int, int, int]) -> PageLine:
    """Draw `text` with its top-left (ascender line) at `origin`; the line and the tight box of its ink."""
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).text(origin, text, font=font, fill=255)
    image.paste(ink, mask=mask)
    return PageLine(text, mask.getbbox())


def light_tone(rng: random.Random) -> tuple[int, int, int]:
    """A plain light background: near white, slightly tinted."""
    level = rng.randint(225, 250)
    return tuple(min(255, level + rng.randint(0, 5)) for _ in range(3))


def dark_tone(rng: random.Random) -> tuple[int, int, int]:
    """Ink: near black, slightly tinted."""
    level = rng.randint(0, 50)
    return tuple(level + rng.randint(0, 20) for _ in range(3))
