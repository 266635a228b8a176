"""What the demo page shows for a result: the text with each grounded span in its entity's colour, and the
annotated image as a PNG file to download. Gradio-free; the colours are `drawing.entity_colours`, the
same the boxes on the image are drawn in.
"""

from __future__ import annotations

import hashlib
import html
import io
from pathlib import Path

from PIL import Image

from kosmos_serve.drawing import RGB, entity_colours, text_colour
from kosmos_serve.engine import Result
from kosmos_serve.grounding import Entity

KEPT_DOWNLOADS = 64  # annotated PNGs kept on disk for download; older ones are deleted


def colour_hex(colour: RGB) -> str:
    """`#rrggbb` of an RGB triple.

    >>> colour_hex((230, 25, 75))
    '#e6194b'
    """
    return "#{:02x}{:02x}{:02x}".format(*colour)


def highlighted_html(result: Result) -> str:
    """The result's text with each grounded span marked in its entity's colour, then the entities, their boxes and
    the boxes' scores."""
    colours = entity_colours(entity.phrase for entity in result.entities)
    pieces, position = [], 0
    for entity in sorted(result.entities, key=lambda e: e.span):
        start, end = entity.span
        if start < position or start == end:  # an empty span (a box without a phrase) has nothing to mark
            continue
        pieces += [html.escape(result.text[position:start]), _mark(entity, colours, result.text[start:end])]
        position = end
    pieces.append(html.escape(result.text[position:]))
    text = "".join(pieces) or "<em>(no text)</em>"
    entities = "".join(
        f"<li>{_mark(entity, colours, entity.phrase)} {html.escape(scored_boxes(entity))}</li>"
        for entity in result.entities
    )
    listing = f'<ul class="kosmos-entities">{entities}</ul>' if entities else "<p>No grounded entities.</p>"
    return f'<div class="kosmos-answer"><p class="kosmos-text">{text}</p>{listing}<p>{_summary(result)}</p></div>'


def _mark(entity: Entity, colours: dict[str, RGB], words: str) -> str:
    colour = colours[entity.phrase]
    style = f"background-color:{colour_hex(colour)};color:{colour_hex(text_colour(colour))};padding:0 0.2em"
    return (f'<mark class="kosmos-entity" data-phrase="{html.escape(entity.phrase)}" style="{style}" '
            f'title="{html.escape(_boxes(entity))}">{html.escape(words)}</mark>')


def _boxes(entity: Entity) -> str:
    return "  ".join(",".join(str(v) for v in box) for box in entity.pixel_boxes)


def scored_boxes(entity: Entity) -> str:
    """The entity's pixel boxes as the listing shows them, each with its score when it has one.

    >>> scored_boxes(Entity("a ball", (0, 6), ((0, 0, 1, 1), (0, 0, 1, 1)), ((1, 2, 3, 4), (5, 6, 7, 8)), (0.913, 0.4)))
    '1,2,3,4 (score 0.91)  5,6,7,8 (score 0.40)'
    """
    scores = [f" (score {score:.2f})" for score in entity.scores] or [""] * len(entity.pixel_boxes)
    return "  ".join(",".join(str(v) for v in box) + score for box, score in zip(entity.pixel_boxes, scores))


def _summary(result: Result) -> str:
    count = len(result.entities)
    return (f"{count} {'entity' if count == 1 else 'entities'} · {result.generated_tokens} new tokens · "
            f"{result.timings.vision + result.timings.generation:.2f} s")


def save_png(image: Image.Image, folder: Path, name: str, keep: int = KEPT_DOWNLOADS) -> Path:
    """Write `image` as `folder/NAME-<content hash>.png` and delete all but the `keep` newest PNGs there."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = folder / f"{name}-{hashlib.sha256(buffer.getvalue()).hexdigest()[:12]}.png"
    path.write_bytes(buffer.getvalue())
    for old in sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)[keep:]:
        old.unlink(missing_ok=True)
    return path
