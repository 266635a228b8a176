"""Labelled images -> Label Studio tasks with predictions, and a labeling config that takes them.

Each box is a `rectanglelabels` region; with a mask format, each box's mask is a `brushlabels` region (Label
Studio's own run-length encoding) or a `polygonlabels` one (the outline of the mask's largest part) instead.
Scores and model versions are the ML backend's (`server/label_studio/`): a region's `score` is its box's,
a prediction's the mean of its regions' (0 when none), `model_version` is `model_version(model, quantize)`.
The labeling config gives each `<Label>` its phrases as `predicted_values`, which the backend grounds.

Each line read (records of task ocr) is two regions of one id, as in Label Studio's OCR template and its OCR ML
backends (label-studio-ml-backend's tesseract and easyocr examples): a `rectanglelabels` region labelled LINE_LABEL
and a `textarea` region of the `<TextArea>` TRANSCRIPTION_NAME holding its text; the labeling config then has that
label and that per-region `<TextArea>`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.exports.masks import brush_rle, mask_pixels, outline
from kosmos_serve.exports.records import LINE_LABEL, AnnotatedImage, ExportReport, LabelledBox, ReadLine
from kosmos_serve.grounding import Mask

LABEL_STUDIO_LOCAL_FILES = "/data/local-files/?d="  # Label Studio's own prefix for files under its document root
DEFAULT_FROM_NAME = "label"
DEFAULT_TO_NAME = "image"
PHRASE_SEPARATOR = ","  # what Label Studio's ML backends split `predicted_values` on
# A region type by the mask format that makes it (None: boxes), and the labeling config's control for it
REGION_TYPES = {None: "rectanglelabels", "brush": "brushlabels", "polygon": "polygonlabels"}
CONTROL_TAGS = {"rectanglelabels": "RectangleLabels", "brushlabels": "BrushLabels", "polygonlabels": "PolygonLabels"}
MASK_FORMATS = ("brush", "polygon")
TRANSCRIPTION_NAME = "transcription"  # the TextArea of Label Studio's OCR template, one text per region
TRANSCRIPTION_ELEMENT = (f'<TextArea name="{TRANSCRIPTION_NAME}" toName={{to_name}} editable="true" perRegion="true" '
                         'required="true" maxSubmissions="1" rows="5" placeholder="Recognized Text" '
                         'displayMode="region-list"/>')  # the template's, word for word


def model_version(model: str, quantize: str = "none") -> str:
    """`kosmos-2:<model>`: the hub id, or a local folder's name, and `+int8` or `+auto` when quantized.

    >>> model_version("microsoft/kosmos-2-patch14-224"), model_version("/models/my-kosmos/", "int8")
    ('kosmos-2:microsoft/kosmos-2-patch14-224', 'kosmos-2:my-kosmos+int8')
    """
    name = Path(model).name if model.startswith((".", "/", "~")) or os.path.isdir(model) else model
    return f"kosmos-2:{name}" + ("" if quantize == "none" else f"+{quantize}")


def prediction(regions: list[dict], version: str) -> dict:
    """One task's prediction: its regions, their mean score (4 decimals; 0 when none, so such tasks sort first), version.
    A line's transcription (`textarea`) shares its rectangle's score and counts once.

    >>> prediction([{"score": 0.9}, {"score": 0.5}], "kosmos-2:demo")["score"], prediction([], "v")["score"]
    (0.7, 0.0)
    """
    scored = [region for region in regions if region.get("type") != "textarea"]
    score = round(sum(region["score"] for region in scored) / len(scored), 4) if scored else 0.0
    return {"result": regions, "score": score, "model_version": version}


def mask_value(mask: Mask, labels: list[str], region_type: str) -> dict | None:
    """A mask as the `value` of a `brushlabels` or `polygonlabels` region (percent points); None when it is empty.

    >>> value = mask_value(Mask((2, 4), "242"), ["car"], "polygonlabels")  # the middle two columns
    >>> value["points"][:4], value["closed"], value["polygonlabels"]
    ([[25.0, 25.0], [37.5, 0.0], [62.5, 0.0], [75.0, 25.0]], True, ['car'])
    """
    pixels = mask_pixels(mask)
    if not pixels.any():
        return None
    if region_type == "brushlabels":
        return {"format": "rle", "rle": brush_rle(pixels), "brushlabels": labels}
    height, width = pixels.shape
    points = [[100 * x / width, 100 * y / height] for x, y in outline(pixels)]
    return {"points": points, "closed": True, "polygonlabels": labels}


def box_value(box: LabelledBox, width: int, height: int) -> dict:
    """A box as the `value` of a `rectanglelabels` region: x, y, width, height in percent of the image."""
    x1, y1, x2, y2 = box.xyxy
    return {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
            "height": 100 * (y2 - y1) / height, "rotation": 0, "rectanglelabels": [box.label]}


def line_regions(line: ReadLine, region_id: str, from_name: str, to_name: str, width: int, height: int,
                 label: str = LINE_LABEL, transcription_name: str = TRANSCRIPTION_NAME) -> list[dict]:
    """A line read as Label Studio's OCR template holds it: a `rectanglelabels` region labelled `label` and a
    `textarea` region of the `<TextArea>` `transcription_name` with its text, of the same id and box (percent of the
    image), each with the line's score. The ML backend (`server/label_studio/`) builds its lines' regions here too.

    >>> box, text = line_regions(ReadLine("TOTAL", (20, 10, 60, 30), (), 0.9), "kosmos-1-1", "label", "image", 200, 100)
    >>> box["type"], box["value"]["rectanglelabels"], text["type"], text["from_name"], text["value"]["text"]
    ('rectanglelabels', ['Text'], 'textarea', 'transcription', ['TOTAL'])
    >>> [text["value"][key] for key in ("x", "y", "width", "height")], text["id"] == box["id"]
    ([10.0, 10.0, 20.0, 20.0], True)
    """
    x1, y1, x2, y2 = line.xyxy
    place = {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
             "height": 100 * (y2 - y1) / height, "rotation": 0}
    common = {"id": region_id, "to_name": to_name, "original_width": width, "original_height": height,
              "image_rotation": 0}
    return [{**common, "type": "rectanglelabels", "from_name": from_name,
             "value": {**place, "rectanglelabels": [label]}, "score": line.score},
            {**common, "type": "textarea", "from_name": transcription_name, "value": {**place, "text": [line.text]},
             "score": line.score}]


def to_label_studio(images: Sequence[AnnotatedImage], from_name: str = DEFAULT_FROM_NAME,
                    to_name: str = DEFAULT_TO_NAME, image_root: str = LABEL_STUDIO_LOCAL_FILES,
                    mask_format: str | None = None, report: ExportReport | None = None) -> list[dict]:
    """Label Studio tasks, one per image: `data.image` is `image_root` + the URL-quoted name, boxes as predictions.

    Box coordinates are percent of the original size, as Label Studio's `rectanglelabels` want them. With
    `mask_format` "brush" or "polygon", each box's mask is its region instead; every box must have one
    (InvalidRequestError otherwise), and a box whose mask is empty is left out (counted in `report`). Each line read
    is a rectangle and its transcription (`line_regions`); a prediction's score is the mean of its boxes' and lines'.
    """
    region_type = REGION_TYPES[mask_format]
    report = report if report is not None else ExportReport()
    tasks = []
    for task_number, image in enumerate(images, start=1):
        regions = []
        for box_number, box in enumerate(image.boxes, start=1):
            if mask_format is None:
                value = box_value(box, image.width, image.height)
                report.masks_not_exported += box.mask is not None
            elif box.mask is None:
                raise InvalidRequestError(f"--mask-format {mask_format}: the boxes of {image.resolved} have no masks; "
                                          "annotate with --masks (and a --segmenter) to get them.")
            elif (value := mask_value(box.mask, [box.label], region_type)) is None:
                report.empty_masks += 1
                continue
            regions.append({"id": f"kosmos-{task_number}-{box_number}", "type": region_type, "from_name": from_name,
                            "to_name": to_name, "original_width": image.width, "original_height": image.height,
                            "image_rotation": 0, "value": value, "score": box.score})
        if image.lines and mask_format is not None:
            raise InvalidRequestError(f"--mask-format {mask_format}: {image.resolved} holds lines read, which are "
                                      "rectangles; export records of task ocr without --mask-format.")
        for line_number, line in enumerate(image.lines, start=len(image.boxes) + 1):
            regions += line_regions(line, f"kosmos-{task_number}-{line_number}", from_name, to_name, image.width,
                                    image.height)
        tasks.append({"data": {"image": image_root + quote(image.name)},
                      "predictions": [prediction(regions, model_version(image.model, image.quantize))]})
    return tasks


def label_studio_config(phrases_by_label: Mapping[str, Iterable[str]], from_name: str = DEFAULT_FROM_NAME,
                        to_name: str = DEFAULT_TO_NAME, mask_format: str | None = None,
                        transcribed: bool = False) -> str:
    """A labeling config that takes these tasks: an Image `to_name` on `$image`, and `from_name` the control of
    their regions (RectangleLabels; BrushLabels or PolygonLabels with a `mask_format`). With `transcribed` (tasks
    with lines read), as Label Studio's OCR template: the label LINE_LABEL, and the per-region `<TextArea>` of texts.

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

    >>> print(label_studio_config({}, transcribed=True))  # doctest: +NORMALIZE_WHITESPACE
    <View>
      <Image name="image" value="$image"/>
      <RectangleLabels name="label" toName="image">
        <Label value="Text"/>
      </RectangleLabels>
      <TextArea name="transcription" toName="image" editable="true" perRegion="true" required="true"
                maxSubmissions="1" rows="5" placeholder="Recognized Text" displayMode="region-list"/>
    </View>
    """
    control = CONTROL_TAGS[REGION_TYPES[mask_format]]
    lines = ["<View>", f'  <Image name={quoteattr(to_name)} value="$image"/>',
             f"  <{control} name={quoteattr(from_name)} toName={quoteattr(to_name)}>"]
    lines += [f"    {label_element(label, phrases)}" for label, phrases in sorted(phrases_by_label.items())]
    if transcribed and LINE_LABEL not in phrases_by_label:
        lines.append(f"    <Label value={quoteattr(LINE_LABEL)}/>")
    lines.append(f"  </{control}>")
    if transcribed:
        lines.append(f"  {TRANSCRIPTION_ELEMENT.format(to_name=quoteattr(to_name))}")
    lines.append("</View>")
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
