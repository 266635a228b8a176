"""Labelled images -> Label Studio tasks with predictions (`rectanglelabels`), and a labeling config that takes them.

Scores and model versions are the ML backend's (`server/label_studio/`): a region's `score` is its box's,
a prediction's the mean of its regions' (0 when none), `model_version` is `model_version(model, quantize)`.
The labeling config gives each `<Label>` its phrases as `predicted_values`, which the backend grounds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.exports.records import AnnotatedImage

LABEL_STUDIO_LOCAL_FILES = "/data/local-files/?d="  # Label Studio's own prefix for files under its document root
DEFAULT_FROM_NAME = "label"
DEFAULT_TO_NAME = "image"
PHRASE_SEPARATOR = ","  # what Label Studio's ML backends split `predicted_values` on


def model_version(model: str, quantize: str = "none") -> str:
    """`kosmos-2:<model>`: the hub id, or a local folder's name, and `+int8` or `+auto` when quantized.

    >>> model_version("microsoft/kosmos-2-patch14-224"), model_version("/models/my-kosmos/", "int8")
    ('kosmos-2:microsoft/kosmos-2-patch14-224', 'kosmos-2:my-kosmos+int8')
    """
    name = Path(model).name if model.startswith((".", "/", "~")) or os.path.isdir(model) else model
    return f"kosmos-2:{name}" + ("" if quantize == "none" else f"+{quantize}")


def prediction(regions: list[dict], version: str) -> dict:
    """One task's prediction: its regions, their mean score (4 decimals; 0 when none, so such tasks sort first), version.

    >>> prediction([{"score": 0.9}, {"score": 0.5}], "kosmos-2:demo")["score"], prediction([], "v")["score"]
    (0.7, 0.0)
    """
    score = round(sum(region["score"] for region in regions) / len(regions), 4) if regions else 0.0
    return {"result": regions, "score": score, "model_version": version}


def to_label_studio(images: Sequence[AnnotatedImage], from_name: str = DEFAULT_FROM_NAME,
                    to_name: str = DEFAULT_TO_NAME, image_root: str = LABEL_STUDIO_LOCAL_FILES) -> list[dict]:
    """Label Studio tasks, one per image: `data.image` is `image_root` + the URL-quoted name, boxes as predictions.

    Coordinates are percent of the original size, as Label Studio's `rectanglelabels` want them.
    """
    tasks = []
    for task_number, image in enumerate(images, start=1):
        regions = []
        for box_number, box in enumerate(image.boxes, start=1):
            x1, y1, x2, y2 = box.xyxy
            regions.append({
                "id": f"kosmos-{task_number}-{box_number}", "type": "rectanglelabels",
                "from_name": from_name, "to_name": to_name,
                "original_width": image.width, "original_height": image.height, "image_rotation": 0,
                "value": {"x": 100 * x1 / image.width, "y": 100 * y1 / image.height,
                          "width": 100 * (x2 - x1) / image.width, "height": 100 * (y2 - y1) / image.height,
                          "rotation": 0, "rectanglelabels": [box.label]},
                "score": box.score,
            })
        tasks.append({"data": {"image": image_root + quote(image.name)},
                      "predictions": [prediction(regions, model_version(image.model, image.quantize))]})
    return tasks


def label_studio_config(phrases_by_label: Mapping[str, Iterable[str]], from_name: str = DEFAULT_FROM_NAME,
                        to_name: str = DEFAULT_TO_NAME) -> str:
    """A labeling config that takes these tasks: an Image `to_name` on `$image`, RectangleLabels `from_name`.

    Each label's phrases (the ontology's for its class, else the label itself) go in `predicted_values`, so
    the ML backend grounds those phrases for it. A phrase with a comma cannot go there (the backend splits
    on commas): a label that is its own only phrase then goes without (the backend grounds its value), any
    other is an InvalidRequestError.

    >>> print(label_studio_config({"car": ["a red car", "a car"], "a dog": ["a dog"]}))
    <View>
      <Image name="image" value="$image"/>
      <RectangleLabels name="label" toName="image">
        <Label value="a dog" predicted_values="a dog"/>
        <Label value="car" predicted_values="a car, a red car"/>
      </RectangleLabels>
    </View>
    """
    lines = ["<View>", f'  <Image name={quoteattr(to_name)} value="$image"/>',
             f"  <RectangleLabels name={quoteattr(from_name)} toName={quoteattr(to_name)}>"]
    lines += [f"    {label_element(label, phrases)}" for label, phrases in sorted(phrases_by_label.items())]
    lines += ["  </RectangleLabels>", "</View>"]
    return "\n".join(lines)


def label_element(label: str, phrases: Iterable[str]) -> str:
    """`<Label value=... predicted_values=.../>` for a label and its phrases (see `label_studio_config`)."""
    phrases = sorted(set(phrases))
    if not any(PHRASE_SEPARATOR in phrase for phrase in phrases):
        return f"<Label value={quoteattr(label)} predicted_values={quoteattr(', '.join(phrases))}/>"
    if phrases == [label]:
        return f"<Label value={quoteattr(label)}/>"
    phrase = next(phrase for phrase in phrases if PHRASE_SEPARATOR in phrase)
    raise InvalidRequestError(f"--label-config: the phrase {phrase!r} of label {label!r} holds a comma, which "
                              "Label Studio's predicted_values cannot carry (it separates phrases); rename it in the "
                              "ontology, or export without --label-config.")
