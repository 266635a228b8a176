"""`predict`: describe and ground a few images here, printed as text or JSON, optionally drawn."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kosmos_serve.cli.options import (
    decoding_options,
    generation_params_from_options,
    model_options,
    settings_from_flags,
    task_input_from_options,
    task_options,
)
from kosmos_serve.config import EngineSettings
from kosmos_serve.errors import InvalidRequestError, KosmosServeError
from kosmos_serve.tasks import TaskInput

# Commands import their work lazily: --help and argument errors answer without loading torch.


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@task_options
@decoding_options
@click.option("--json", "as_json", is_flag=True, help="Print results as a JSON list.")
@click.option("--draw", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the annotated image here (with several images: NAME_1.png, NAME_2.png, ...).")
@model_options
def predict(images, task, prompt, phrases, boxes, no_grounding, max_new_tokens, sample, top_p, temperature, seed,
            no_repeat_ngram_size, min_score, nms_iou, masks, as_json, draw, **flags):
    """Describe and ground IMAGES; prints the text, then each entity with its pixel boxes and their scores.

    \b
    Examples:
      kosmos-serve predict snowman.png
      kosmos-serve predict snowman.png --task phrase_grounding --phrase "a snowman"
      kosmos-serve predict snowman.png --task referring_generation --box 250,22,630,397
      kosmos-serve predict snowman.png --prompt "<grounding> Describe this image in detail:"
      kosmos-serve predict snowman.png --task phrase_grounding --phrase "a snowman" --segmenter demo --masks
    """
    settings = settings_from_flags(EngineSettings, flags)
    task_input = task_input_from_options(task, prompt, phrases, boxes, no_grounding)
    params = generation_params_from_options(max_new_tokens, sample, top_p, temperature, seed, no_repeat_ngram_size,
                                            min_score, nms_iou, masks)
    if masks and settings.segmenter is None:  # refused before any model loads
        raise InvalidRequestError("Masks need a segmenter: add --segmenter MODEL (or set KOSMOS_SEGMENTER), e.g. "
                                  "--segmenter demo.", "masks")
    loaded = [load_image_file(path, settings.max_image_pixels) for path in images]
    from kosmos_serve.engine import Request, check_task, start_engine  # after the cheap checks: torch takes seconds

    requests = [Request(image, task_input, params) for image in loaded]
    for request in requests:  # refuse bad input before spending seconds on loading the model
        check_task(request.task, request.params, settings, request.image.size)
    engine = start_engine(settings)
    if task is None and not (prompt or phrases or boxes or no_grounding):  # the model's own default task
        requests = [Request(image, TaskInput(engine.family.tasks[0]), params) for image in loaded]
    results = engine.run(requests)
    if as_json:
        payload = [{"image": str(path), **result.to_dict()} for path, result in zip(images, results)]
        click.echo(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        for path, result in zip(images, results):
            click.echo(summary(path, result))
    if draw:
        from kosmos_serve.drawing import draw_result

        for number, (image, result) in enumerate(zip(loaded, results), start=1):
            target = draw if len(loaded) == 1 else draw.with_name(f"{draw.stem}_{number}{draw.suffix}")
            draw_result(image, result).save(target)
            click.echo(f"Wrote the drawn image to {target}", err=True)  # stderr: --json keeps stdout to itself


def load_image_file(path: Path, max_pixels: int):
    """Load one image for the CLI; an error names the file it is about."""
    from kosmos_serve.images import load_image

    try:
        return load_image(path, max_pixels=max_pixels)
    except KosmosServeError as error:
        raise type(error)(f"{path}: {error.message}") from error


def summary(path: Path, result) -> str:
    """A readable block: image and size, the text, then each entity with its pixel boxes, each with its score (and its
    mask's score, when masks were made), and each line read (ocr) with its box.

    >>> from types import SimpleNamespace
    >>> from kosmos_serve.grounding import Entity
    >>> circle = Entity("a circle", (0, 8), ((0, 0, .5, .5), (.5, .5, 1, 1)), ((0, 0, 5, 5), (5, 5, 9, 9)),
    ...                 (0.912, 0.4))
    >>> print(summary(Path("a.png"), SimpleNamespace(image_size=(10, 10), text="a circle", entities=(circle,),
    ...                                              lines=())))
    a.png (10x10)
      a circle
      - a circle: [0, 0, 5, 5] score 0.91  [5, 5, 9, 9] score 0.40
    >>> from kosmos_serve.grounding import TextLine
    >>> print(summary(Path("r.png"), SimpleNamespace(image_size=(90, 40), text="SUB TOTAL\\nTOTAL\\n", entities=(),
    ...                                              lines=(TextLine("SUB TOTAL", (2, 3, 80, 12), 0.87),))))
    r.png (90x40)
      SUB TOTAL
      TOTAL
      - [2, 3, 80, 12] score 0.87 SUB TOTAL
    """
    width, height = result.image_size
    lines = [f"{path} ({width}x{height})", *(f"  {line}" for line in result.text.rstrip("\n").split("\n"))]
    for entity in result.entities:
        scores = [f" score {score:.2f}" for score in entity.scores] or [""] * len(entity.pixel_boxes)
        masks = [f" mask {score:.2f}" for score in entity.mask_scores] or [""] * len(entity.pixel_boxes)
        boxes = "  ".join(f"{list(box)}{score}{mask}" for box, score, mask in zip(entity.pixel_boxes, scores, masks))
        lines.append(f"  - {entity.phrase}: {boxes}")
    lines.extend(f"  - {list(line.box)} score {line.score:.2f} {line.text}" for line in result.lines)
    return "\n".join(lines)
