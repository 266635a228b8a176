"""Results: one request's rows (generated prompts) -> its grounded answer, timings and sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kosmos_serve.engine.requests import PreparedRequest, Row
from kosmos_serve.grounding import Entity, GroundedText, TextLine, render_markdown, suppress_overlaps
from kosmos_serve.ocr import lines_markdown
from kosmos_serve.tasks import Task, parse_task


@dataclass(frozen=True)
class Timings:
    """Seconds spent on this request's image features, on generating its rows (admission to last token) and, when it
    asked for masks, on segmenting its boxes (None when it did not)."""

    vision: float = 0.0
    generation: float = 0.0
    segmentation: float | None = None

    def to_dict(self) -> dict[str, float]:
        """`vision_seconds` and `generation_seconds`, and `segmentation_seconds` when there was segmenting."""
        seconds = {"vision_seconds": self.vision, "generation_seconds": self.generation}
        if self.segmentation is not None:
            seconds["segmentation_seconds"] = self.segmentation
        return seconds


@dataclass(frozen=True)
class Result:
    """A grounded answer: reference text and entities, pixel boxes, markdown, sizes and timings; for `ocr`, the lines
    read, each with its box."""

    task: Task
    prompt: str
    text: str
    answer: str
    raw_text: str
    entities: tuple[Entity, ...]
    markdown: str
    image_size: tuple[int, int]
    generated_tokens: int
    image_cached: bool
    timings: Timings
    lines: tuple[TextLine, ...] = ()

    def to_dict(self) -> dict:
        """A JSON-ready dict: entities as objects with normalised and pixel boxes; for `ocr`, the lines."""
        answer = {
            "task": self.task.value,
            "prompt": self.prompt,
            "text": self.text,
            "answer": self.answer,
            "raw_text": self.raw_text,
            "entities": [entity_dict(e) for e in self.entities],
            "markdown": self.markdown,
            "image_size": list(self.image_size),
            "generated_tokens": self.generated_tokens,
            "image_cached": self.image_cached,
            "timings": self.timings.to_dict(),
        }
        if self.task is Task.OCR:
            answer["lines"] = [line_dict(line) for line in self.lines]
        return answer


def entity_dict(entity: Entity) -> dict:
    """An entity as JSON: phrase, span, normalised and pixel boxes, scores; masks and their scores when asked for."""
    answer = {"phrase": entity.phrase, "span": list(entity.span), "boxes": [list(b) for b in entity.boxes],
              "pixel_boxes": [list(b) for b in entity.pixel_boxes], "scores": list(entity.scores)}
    if entity.masks:
        answer["masks"] = [mask.to_dict() for mask in entity.masks]
        answer["mask_scores"] = list(entity.mask_scores)
    return answer


def line_dict(line: TextLine) -> dict:
    """A line as JSON: its text, its four corners and its box, in pixels, and its score.

    >>> line_dict(TextLine("Total 50,000", (24, 872, 827, 921), 0.8731))
    {'text': 'Total 50,000', 'corners': [[24, 872], [827, 872], [827, 921], [24, 921]], 'box': [24, 872, 827, 921], \
'score': 0.8731}
    """
    return {"text": line.text, "corners": [list(corner) for corner in line.corners], "box": list(line.box),
            "score": line.score}


def combine_detections(rows: list[Row]) -> GroundedText:
    """One result for a detection request: the phrases as text, each linked to the boxes found for it."""
    phrases = [row.spec.phrase for row in rows]
    text = ", ".join(phrases)
    entities = []
    start = 0
    for row, phrase in zip(rows, phrases):
        found = next((e for e in row.output.entities if e.phrase == phrase), None)
        if found is not None:
            entities.append(dataclasses.replace(found, span=(start, start + len(phrase))))
        start += len(phrase) + 2
    entities = tuple(entities)
    return GroundedText(
        text=text,
        answer=text,
        raw_text="\n".join(row.output.raw_text for row in rows),
        entities=entities,
        markdown=render_markdown(text, entities),
    )


def kept_boxes(output: GroundedText, min_score: float | None, nms_iou: float | None) -> GroundedText:
    """`output` with only the boxes scored `min_score` or more that no higher-scored box of another phrase overlaps
    by more than `nms_iou` (entities left without a box dropped; None: that filter off), and only the lines read
    (Kosmos-2.5's `<ocr>`) scored `min_score` or more; the text stays, the markdown follows what is kept."""
    entities, lines = output.entities, output.lines
    if nms_iou is not None:
        entities = suppress_overlaps(entities, nms_iou)
    if min_score is not None:
        entities = tuple(kept for entity in entities if (kept := entity.keeping(min_score)) is not None)
        lines = tuple(line for line in lines if line.score >= min_score)
    if entities == output.entities and lines == output.lines:
        return output
    markdown = lines_markdown(lines) if output.lines else render_markdown(output.text, entities)
    return dataclasses.replace(output, entities=entities, lines=lines, markdown=markdown)


def build_result(prepared: PreparedRequest, rows: list[Row], vision_seconds: dict[str, float],
                 cached_keys: set[str]) -> Result:
    """One request's result from its generated rows, with its image's vision time and cache state.

    Boxes scored under the request's `min_score`, or overlapping a higher-scored box of another phrase by more than
    its `nms_iou`, are dropped (detection: by the defaults when none is given).
    """
    request = prepared.request
    key = rows[0].image_key
    timings = Timings(vision_seconds.get(key, 0.0), sum(row.generation_seconds for row in rows))
    task = parse_task(request.task.task)
    output = combine_detections(rows) if task is Task.DETECTION else rows[0].output
    output = kept_boxes(output, prepared.min_score, prepared.nms_iou)
    return Result(
        task=task,
        prompt="\n".join(row.spec.text for row in rows),
        text=output.text,
        answer=output.answer,
        raw_text=output.raw_text,
        entities=output.entities,
        markdown=output.markdown,
        image_size=request.image.size,
        generated_tokens=sum(row.generated_tokens for row in rows),
        image_cached=key in cached_keys,
        timings=timings,
        lines=output.lines,
    )
