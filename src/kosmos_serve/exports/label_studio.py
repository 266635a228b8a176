"""Labelled images -> Label Studio tasks with predictions (`rectanglelabels`), and a labeling config that takes them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from kosmos_serve.exports.records import AnnotatedImage

LABEL_STUDIO_LOCAL_FILES = "/data/local-files/?d="  # Label Studio's own prefix for files under its document root
DEFAULT_FROM_NAME = "label"
DEFAULT_TO_NAME = "image"


def model_version(model: str, quantize: str = "none") -> str:
    """`kosmos-2:<model>`: the hub id, or a local folder's name, and `+int8` or `+auto` when quantized.

    >>> model_version("microsoft/kosmos-2-patch14-224"), model_version("/models/my-kosmos/", "int8")
    ('kosmos-2:microsoft/kosmos-2-patch14-224', 'kosmos-2:my-kosmos+int8')
    """
    name = Path(model).name if model.startswith((".", "/", "~")) or os.path.isdir(model) else model
    return f"kosmos-2:{name}" + ("" if quantize == "none" else f"+{quantize}")


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
            })
        tasks.append({"data": {"image": image_root + quote(image.name)},
                      "predictions": [{"model_version": image.model, "result": regions}]})
    return tasks


def label_studio_config(labels: Iterable[str], from_name: str = DEFAULT_FROM_NAME,
                        to_name: str = DEFAULT_TO_NAME) -> str:
    """A labeling config that takes these tasks: an Image `to_name` on `$image`, RectangleLabels `from_name`.

    >>> print(label_studio_config(["a car"]))
    <View>
      <Image name="image" value="$image"/>
      <RectangleLabels name="label" toName="image">
        <Label value="a car"/>
      </RectangleLabels>
    </View>
    """
    lines = ["<View>", f'  <Image name={quoteattr(to_name)} value="$image"/>',
             f"  <RectangleLabels name={quoteattr(from_name)} toName={quoteattr(to_name)}>"]
    lines += [f"    <Label value={quoteattr(label)}/>" for label in sorted(set(labels))]
    lines += ["  </RectangleLabels>", "</View>"]
    return "\n".join(lines)
