"""A Label Studio labeling config read for detection: its `<RectangleLabels>` on an `<Image>` (or `<BrushLabels>` or
`<PolygonLabels>`, whose regions are the boxes' masks), the phrases each `<Label>` stands for, the plan of phrases to ground for a task (the annotator's typed prompt, when there is one),
and the score under which boxes are dropped (a `<Number name="min_score">`, when there is one).

Or, for a Kosmos-2.5 model, which reads pages: Label Studio's OCR template, a `<Labels>` or `<RectangleLabels>` on an
`<Image>` whose label the lines' rectangles carry, and the per-region `<TextArea>` that holds each line's text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from pydantic import TypeAdapter, ValidationError

from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.exports.records import LINE_LABEL
from kosmos_serve.server.common import MinScoreField

_MIN_SCORE = TypeAdapter(MinScoreField)

PROMPT_SEPARATORS = re.compile(r"[\n;,.]")
MIN_SCORE_CONTROL = "min_score"  # a <Number> of this name sets the threshold, as Grounding DINO backends' do theirs
# The controls whose regions this backend predicts, by tag in lower case: the type of the regions each takes
REGION_TYPES = ("rectanglelabels", "brushlabels", "polygonlabels")
# The controls whose label a line's rectangle carries: the OCR template's <Labels> (with its <Rectangle>), or a
# <RectangleLabels> (as the export's config has)
LINE_LABEL_CONTROLS = ("labels", "rectanglelabels")
OCR_TEMPLATE_EXAMPLE = ('<Labels name="label" toName="image"><Label value="Text"/></Labels> and <TextArea '
                        'name="transcription" toName="image" perRegion="true"/> for <Image name="image" value="$image"/>')


@dataclass(frozen=True)
class LabelSpec:
    """A `<Label>`: the value a region carries and the phrases Kosmos-2 is asked to ground for it."""

    value: str
    phrases: tuple[str, ...]


@dataclass(frozen=True)
class DetectionConfig:
    """What `/predict` needs from a labeling config."""

    from_name: str  # the <RectangleLabels> (or <BrushLabels>, <PolygonLabels>) control
    to_name: str  # the <Image> it labels
    image_field: str  # the task data key the image reads: value="$image" -> "image"
    labels: tuple[LabelSpec, ...]
    prompt_from: str | None = None  # a <TextArea> on the same image, whose text replaces the labels' phrases
    min_score_from: str | None = None  # a <Number name="min_score">, whose value is the threshold
    min_score: float | None = None  # that control's defaultValue
    region_type: str = "rectanglelabels"  # "brushlabels" or "polygonlabels": the regions are the boxes' masks

    @property
    def masks(self) -> bool:
        """Whether the regions are masks, which the engine's segmenter draws for each box."""
        return self.region_type != "rectanglelabels"


@dataclass(frozen=True)
class ReadingConfig:
    """What `/predict` needs from an OCR labeling config to put the lines of a page read in it."""

    from_name: str  # the <Labels> (or <RectangleLabels>) control whose label each line's rectangle carries
    to_name: str  # the <Image> it labels
    image_field: str  # the task data key the image reads
    line_label: str  # LINE_LABEL when the control has it, else its first <Label>
    transcription_from: str  # the per-region <TextArea> that holds each line's text
    min_score_from: str | None = None  # a <Number name="min_score">, whose value is the threshold
    min_score: float | None = None  # that control's defaultValue


def parse_labeling_config(xml: str) -> DetectionConfig:
    """The first `<RectangleLabels>`, `<BrushLabels>` or `<PolygonLabels>` on an `<Image>`, its labels and phrases,
    and a `<TextArea>` prompt if any.

    >>> config = parse_labeling_config('<View><Image name="img" value="$photo"/><RectangleLabels name="box" '
    ...     'toName="img"><Label value="Car" predicted_values="car, truck"/><Label value="Dog" hint="a dog"/>'
    ...     '<Label value="cat"/></RectangleLabels></View>')
    >>> config.from_name, config.to_name, config.image_field
    ('box', 'img', 'photo')
    >>> [(label.value, label.phrases) for label in config.labels]
    [('Car', ('car', 'truck')), ('Dog', ('a dog',)), ('cat', ('cat',))]
    >>> parse_labeling_config('<View><Image name="img" value="$photo"/><BrushLabels name="mask" toName="img">'
    ...     '<Label value="Car"/></BrushLabels></View>').region_type
    'brushlabels'
    """
    tags = _elements(xml)
    images = _images(tags)
    controls = [tag for tag in tags if tag.tag.lower() in REGION_TYPES]
    example = ('<RectangleLabels name="label" toName="image"><Label value="cat"/></RectangleLabels> '
               'for <Image name="image" value="$image"/>')
    if not controls and any(_is_transcription(tag) for tag in tags):
        raise InvalidRequestError("The labeling config is for reading text (a per-region <TextArea>, as Label Studio's "
                                  "OCR template), and this service runs a Kosmos-2 model, which finds phrases' boxes. "
                                  "Serve a Kosmos-2.5 model (--model microsoft/kosmos-2.5) to read pages, or label "
                                  f"boxes with a <RectangleLabels> control, e.g. {example}.")
    if not controls:
        raise InvalidRequestError(f"The labeling config has no <RectangleLabels> control, which is what this backend "
                                  f"predicts (boxes; <BrushLabels> or <PolygonLabels> for masks); add one, e.g. "
                                  f"{example}.")
    for control in controls:
        image = _labelled_image(control, images)
        if image is not None:
            return _detection_config(control, image, tags)
    raise InvalidRequestError(f"No <RectangleLabels> (or <BrushLabels>, <PolygonLabels>) in the labeling config points "
                              f"at an <Image> (toName must be an <Image>'s name), e.g. {example}.")


def parse_reading_config(xml: str) -> ReadingConfig:
    """The first `<Labels>` or `<RectangleLabels>` on an `<Image>` that has a per-region `<TextArea>` (Label Studio's OCR
    template), the label its lines carry, and that `<TextArea>`.

    >>> config = parse_reading_config('<View><Image name="image" value="$ocr"/><Labels name="label" toName="image">'
    ...     '<Label value="Handwriting"/><Label value="Text"/></Labels><Rectangle name="bbox" toName="image"/>'
    ...     '<TextArea name="transcription" toName="image" perRegion="true"/></View>')
    >>> config.from_name, config.image_field, config.line_label, config.transcription_from
    ('label', 'ocr', 'Text', 'transcription')
    """
    tags = _elements(xml)
    images = _images(tags)
    transcriptions = [tag for tag in tags if _is_transcription(tag)]
    for control in (tag for tag in tags if tag.tag.lower() in LINE_LABEL_CONTROLS):
        image = _labelled_image(control, images)
        if image is None:
            continue
        to_name = image.get("name")
        transcription = next((tag.get("name") for tag in transcriptions if to_name in _targets(tag)), None)
        if transcription is None:
            raise InvalidRequestError(f"The labeling config has no per-region <TextArea> (perRegion=\"true\") on "
                                      f"<Image name=\"{to_name}\">, where each line this Kosmos-2.5 model reads puts "
                                      f"its text; add one as Label Studio's OCR template has it, e.g. "
                                      f"{OCR_TEMPLATE_EXAMPLE}.")
        from_name = _control_name(control)
        values = [label.get("value") for label in control.iter() if label.tag.lower() == "label" and label.get("value")]
        if not values:
            raise InvalidRequestError(f"<{control.tag} name=\"{from_name}\"> has no <Label> for the lines read; add "
                                      f"one (<Label value=\"{LINE_LABEL}\"/>).")
        line_label = LINE_LABEL if LINE_LABEL in values else values[0]
        threshold_from, threshold = _threshold_control(tags)
        return ReadingConfig(from_name, to_name, _image_field(image), line_label, transcription, threshold_from,
                             threshold)
    raise InvalidRequestError(f"No <Labels> or <RectangleLabels> in the labeling config points at an <Image> (toName "
                              f"must be an <Image>'s name); a Kosmos-2.5 model fills Label Studio's OCR template, e.g. "
                              f"{OCR_TEMPLATE_EXAMPLE}.")


def _elements(xml: str) -> list[ElementTree.Element]:
    """Every element of a labeling config, or a 422 when it is not well-formed (or declares entities)."""
    if "<!DOCTYPE" in xml.upper() or "<!ENTITY" in xml.upper():
        raise InvalidRequestError("The labeling config declares a DOCTYPE or entities, which Label Studio configs "
                                  "never need; remove them.")
    try:
        return list(ElementTree.fromstring(xml).iter())
    except ElementTree.ParseError as error:
        raise InvalidRequestError(f"The labeling config is not well-formed XML ({error}).") from None


def _images(tags: list[ElementTree.Element]) -> dict[str, ElementTree.Element]:
    return {tag.get("name"): tag for tag in tags if tag.tag.lower() == "image" and tag.get("name")}


def _targets(tag: ElementTree.Element) -> list[str]:
    """The names in a control's `toName`."""
    return [name.strip() for name in (tag.get("toName") or "").split(",") if name.strip()]


def _labelled_image(control: ElementTree.Element, images: dict[str, ElementTree.Element]) -> ElementTree.Element | None:
    """The `<Image>` a control labels; None when it labels no image; a 422 when it names several objects."""
    targets = _targets(control)
    if len(targets) > 1 and any(name in images for name in targets):
        raise InvalidRequestError(f"<{control.tag} name=\"{control.get('name')}\"> names {len(targets)} objects "
                                  f"({', '.join(targets)}); point it at one <Image>.")
    return images.get(targets[0]) if targets else None


def _is_transcription(tag: ElementTree.Element) -> bool:
    """Whether `tag` is a per-region `<TextArea>`: one text per region, as the OCR template's transcription."""
    return tag.tag.lower() == "textarea" and bool(tag.get("name")) and (tag.get("perRegion") or "").lower() == "true"


def _control_name(control: ElementTree.Element) -> str:
    name = control.get("name")
    if not name:
        raise InvalidRequestError(f"The <{control.tag}> control has no name; give it one (name=\"label\").")
    return name


def _image_field(image: ElementTree.Element) -> str:
    """The task data key an `<Image>` reads: value="$image" -> "image"."""
    value = image.get("value") or ""
    if not value.startswith("$") or len(value) < 2:
        raise InvalidRequestError(f"<Image name=\"{image.get('name')}\"> must read its image from the task data "
                                  f"(value=\"$image\"); got value=\"{value}\".")
    return value[1:]


def _threshold_control(tags: list[ElementTree.Element]) -> tuple[str | None, float | None]:
    """The `<Number name="min_score">` control's name and defaultValue, when the config has one."""
    number = next((tag for tag in tags if tag.tag.lower() == "number" and tag.get("name") == MIN_SCORE_CONTROL), None)
    if number is None:
        return None, None
    default = number.get("defaultValue")
    where = f'<Number name="{MIN_SCORE_CONTROL}">\'s defaultValue'
    return MIN_SCORE_CONTROL, None if default is None else checked_min_score(default, where)


def _detection_config(control: ElementTree.Element, image: ElementTree.Element, tags) -> DetectionConfig:
    from_name, to_name, region_type = _control_name(control), image.get("name"), control.tag.lower()
    image_field = _image_field(image)
    labels = tuple(_label_spec(label, control.tag) for label in control.iter() if label.tag.lower() == "label")
    if not labels:
        raise InvalidRequestError(f"<{control.tag} name=\"{from_name}\"> has no <Label> to detect; add one "
                                  f"(<Label value=\"cat\"/>); labels loaded from task data are not supported.")
    prompt = next((tag.get("name") for tag in tags if tag.tag.lower() == "textarea" and tag.get("name")
                   and to_name in _targets(tag)), None)
    threshold_from, threshold = _threshold_control(tags)
    return DetectionConfig(from_name, to_name, image_field, labels, prompt, threshold_from, threshold, region_type)


def checked_min_score(value: Any, where: str) -> float:
    """`value` as a threshold from 0 to 1, or a 422 naming `where` it comes from.

    >>> checked_min_score("0.5", "defaultValue")
    0.5
    >>> checked_min_score(2, "The control's value")
    Traceback (most recent call last):
    ...
    kosmos_serve.errors.InvalidRequestError: min_score: The control's value is 2; give a number from 0 to 1.
    """
    try:
        return _MIN_SCORE.validate_python(value)  # the protocols' own range (0..1, finite, no booleans)
    except ValidationError:
        raise InvalidRequestError(f"{where} is {value!r}; give a number from 0 to 1.",
                                  field="min_score") from None


def min_score(config: DetectionConfig | ReadingConfig, context: dict[str, Any] | None, default: float) -> float:
    """The score under which boxes (or lines) are dropped: the annotator's value in the `<Number name="min_score">`
    control (interactive pre-annotation), else that control's defaultValue, else `default` (the service's).

    >>> config = DetectionConfig("label", "image", "image", (), min_score_from="min_score", min_score=0.4)
    >>> min_score(config, None, 0.3), min_score(config, {"result": [{"from_name": "min_score", "type": "number",
    ...                                                              "value": {"number": 0.6}}]}, 0.3)
    (0.4, 0.6)
    """
    if config.min_score_from and isinstance(context, dict) and isinstance(context.get("result"), list):
        for region in context["result"]:
            if isinstance(region, dict) and region.get("from_name") == config.min_score_from:
                value = region.get("value")
                number = value.get("number") if isinstance(value, dict) else None
                return checked_min_score(number, f'The <Number name="{config.min_score_from}"> control\'s value')
    return config.min_score if config.min_score is not None else default


def _label_spec(label: ElementTree.Element, control: str) -> LabelSpec:
    value = (label.get("value") or "").strip()
    if not value:
        raise InvalidRequestError(f"A <Label> in the <{control}> control has no value; give each label one.")
    predicted = [name.strip() for name in (label.get("predicted_values") or "").split(",") if name.strip()]
    hint = (label.get("hint") or "").strip()
    return LabelSpec(value, tuple(predicted) or ((hint,) if hint else (value,)))


def detection_plan(config: DetectionConfig, context: dict[str, Any] | None) -> dict[str, LabelSpec | None]:
    """The phrases to ground, each with the label its boxes carry (None: none fits, the annotator picks).

    The annotator's text in the config's `<TextArea>`, when the interactive context carries it, is
    one phrase per line (or per comma); otherwise every label's phrases.

    >>> config = DetectionConfig("label", "image", "image", (LabelSpec("circle", ("circle",)),
    ...                          LabelSpec("square", ("a square",))), prompt_from="prompt")
    >>> list(detection_plan(config, None))
    ['circle', 'a square']
    >>> context = {"result": [{"from_name": "prompt", "type": "textarea",
    ...                        "value": {"text": ["the blue circle, a star"]}}]}
    >>> [(phrase, label and label.value) for phrase, label in detection_plan(config, context).items()]
    [('the blue circle', 'circle'), ('a star', None)]
    """
    typed = [part.strip() for part in PROMPT_SEPARATORS.split(_prompt_text(config, context)) if part.strip()]
    if typed:
        return {phrase: label_for_phrase(phrase, config.labels) for phrase in typed}
    plan: dict[str, LabelSpec | None] = {}
    for label in config.labels:
        for phrase in label.phrases:
            plan.setdefault(phrase, label)
    return plan


def _prompt_text(config: DetectionConfig, context: dict[str, Any] | None) -> str:
    if not config.prompt_from or not isinstance(context, dict) or not isinstance(context.get("result"), list):
        return ""
    for region in context["result"]:
        if isinstance(region, dict) and region.get("from_name") == config.prompt_from:
            text = (region.get("value") or {}).get("text") if isinstance(region.get("value"), dict) else None
            if isinstance(text, list):
                return "\n".join(str(line) for line in text)
            if isinstance(text, str):
                return text
    return ""


def label_for_phrase(phrase: str, labels: tuple[LabelSpec, ...]) -> LabelSpec | None:
    """The label a typed phrase names (its value or a phrase of it, as whole words; longest wins), else the only one.

    >>> labels = (LabelSpec("circle", ("circle",)), LabelSpec("blue circle", ("blue circle",)))
    >>> label_for_phrase("the Blue Circle", labels).value
    'blue circle'
    >>> label_for_phrase("a star", labels) is None
    True
    """
    best, best_length = None, 0
    for label in labels:
        for name in (label.value, *label.phrases):
            if len(name) > best_length and re.search(rf"(?<!\w){re.escape(name.lower())}(?!\w)", phrase.lower()):
                best, best_length = label, len(name)
    return best if best is not None else (labels[0] if len(labels) == 1 else None)

