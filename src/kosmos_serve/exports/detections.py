"""One result (annotation record or engine.Result) -> `supervision.Detections`; supervision is an optional extra."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kosmos_serve.errors import InvalidRequestError, KosmosServeError
from kosmos_serve.exports.masks import mask_pixels
from kosmos_serve.exports.records import (
    LINE_LABEL,
    LabelledBox,
    entity_boxes,
    entity_problem,
    line_problem,
    record_lines,
)

SUPERVISION_INSTALL_HINT = 'kosmos_serve.exports.to_detections needs supervision: pip install -e ".[supervision]"'


class MissingExtraError(KosmosServeError, ImportError):
    """An optional dependency is not installed; the message names the pip command that installs it."""

    status = 501
    code = "missing_extra"


def to_detections(result, class_map: Mapping[str, str] | None = None, classes: Sequence[str] | None = None):
    """One result as `supervision.Detections`: xyxy pixels, `confidence` (each box's score), `data["class_name"]`
    and `data["phrase"]`; when the result has masks (asked for with `masks`), `mask` (N x H x W booleans) and
    `data["mask_score"]` (the segmenter's score for each). Each line read (task ocr) is a box of the class name
    LINE_LABEL whose `phrase` is its text and whose confidence is its score (1.0 in records from before line scores).

    `result` is an annotation record (dict), an `engine.Result` or `Result.to_dict()`. A box's class
    name is its entity's `class` (records from an ontology), else `class_map[phrase]`, else the
    phrase. With `classes`, `class_id` is each name's index in it and boxes of other names are left
    out; without, `class_id` is None. Reversed corners are put in order and boxes of zero area left
    out, as in every export. A failed record raises InvalidRequestError.
    """
    try:
        import numpy as np
        import supervision as sv
    except ImportError as error:
        raise MissingExtraError(SUPERVISION_INSTALL_HINT) from error
    if isinstance(result, Mapping):
        if (error := result.get("error")) is not None:
            code = error.get("code") if isinstance(error, Mapping) else error
            raise InvalidRequestError(f"the record of {result.get('path')} is a failure ({code}); it has no boxes.")
        entities, lines = result.get("entities"), result.get("lines") or []
        problems = (["it has no list of 'entities'"] if not isinstance(entities, list) else
                    [f"entity {n}: {problem}" for n, entity in enumerate(entities)
                     if (problem := entity_problem(entity))])
        problems += (["its 'lines' are not a list"] if not isinstance(lines, list) else
                     [f"line {n}: {problem}" for n, line in enumerate(lines) if (problem := line_problem(line))])
        if problems:
            raise InvalidRequestError(f"not a result or annotation record: {problems[0]}.")
    else:
        entities = result.entities
        lines = [{"text": line.text, "box": list(line.box), "corners": [list(c) for c in line.corners],
                  "score": line.score} for line in result.lines]
    boxes = entity_boxes(entities, class_map)
    boxes += [LabelledBox(LINE_LABEL, line.text, line.xyxy, line.score) for line in record_lines(lines)]
    if classes is not None:
        index = {name: number for number, name in enumerate(classes)}
        boxes = [box for box in boxes if box.label in index]
    xyxy = np.array([box.xyxy for box in boxes], dtype=float).reshape(-1, 4)
    class_id = np.array([index[box.label] for box in boxes], dtype=int) if classes is not None else None
    confidence = np.array([box.score for box in boxes], dtype=float)
    data = {"class_name": np.array([box.label for box in boxes], dtype=str),
            "phrase": np.array([box.phrase for box in boxes], dtype=str)}
    masked = bool(boxes) and all(box.mask is not None for box in boxes)
    if masked:
        data["mask_score"] = np.array([box.mask_score for box in boxes], dtype=float)
    return sv.Detections(xyxy=xyxy, confidence=confidence, class_id=class_id, data=data,
                         mask=np.stack([mask_pixels(box.mask) for box in boxes]) if masked else None)
