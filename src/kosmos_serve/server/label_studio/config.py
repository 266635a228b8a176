"""A Label Studio labeling config read for detection: its `<RectangleLabels>` on an `<Image>` (or `<BrushLabels>` or
`<PolygonLabels>`, whose regions are the boxes' masks), the phrases each `<Label>` stands for, the plan of phrases to ground for a task (the annotator's typed prompt, when there is one),
and the score under which boxes are dropped (a `<Number name="min_score">`, when there is one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from pydantic import TypeAdapter, ValidationError

from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.server.common import MinScoreField

_MIN_SCORE = TypeAdapter(MinScoreField)

PROMPT_SEPARATORS = re.compile(r"[\n;,.]")
MIN_SCORE_CONTROL = "min_score"  # a <Number> of this name sets the threshold, as Grounding DINO backends' do theirs
# The controls whose regions this backend predicts, by tag in lower case: the type of the regions each takes
REGION_TYPES = ("rectanglelabels", "brushlabels", "polygonlabels")


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
    if "<!DOCTYPE" in xml.upper() or "<!ENTITY" in xml.upper():
        raise InvalidRequestError("The labeling config declares a DOCTYPE or entities, which Label Studio configs "
                                  "never need; remove them.")
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as error:
        raise InvalidRequestError(f"The labeling config is not well-formed XML ({error}).") from None
    tags = list(root.iter())
    images = {tag.get("name"): tag for tag in tags if tag.tag.lower() == "image" and tag.get("name")}
    controls = [tag for tag in tags if tag.tag.lower() in REGION_TYPES]
    example = ('<RectangleLabels name="label" toName="image"><Label value="cat"/></RectangleLabels> '
               'for <Image name="image" value="$image"/>')
    if not controls:
        raise InvalidRequestError(f"The labeling config has no <RectangleLabels> control, which is what this backend "
                                  f"predicts (boxes; <BrushLabels> or <PolygonLabels> for masks); add one, e.g. "
                                  f"{example}.")
    for control in controls:
        targets = [name.strip() for name in (control.get("toName") or "").split(",") if name.strip()]
        if len(targets) > 1 and any(name in images for name in targets):
            raise InvalidRequestError(f"<{control.tag} name=\"{control.get('name')}\"> names {len(targets)} objects "
                                      f"({', '.join(targets)}); point it at one <Image>.")
        if targets and targets[0] in images:
            return _detection_config(control, images[targets[0]], tags)
    raise InvalidRequestError(f"No <RectangleLabels> (or <BrushLabels>, <PolygonLabels>) in the labeling config points "
                              f"at an <Image> (toName must be an <Image>'s name), e.g. {example}.")


def _detection_config(control: ElementTree.Element, image: ElementTree.Element, tags) -> DetectionConfig:
    from_name, to_name, region_type = control.get("name"), image.get("name"), control.tag.lower()
    if not from_name:
        raise InvalidRequestError(f"The <{control.tag}> control has no name; give it one (name=\"label\").")
    value = image.get("value") or ""
    if not value.startswith("$") or len(value) < 2:
        raise InvalidRequestError(f"<Image name=\"{to_name}\"> must read its image from the task data "
                                  f"(value=\"$image\"); got value=\"{value}\".")
    labels = tuple(_label_spec(label, control.tag) for label in control.iter() if label.tag.lower() == "label")
    if not labels:
        raise InvalidRequestError(f"<{control.tag} name=\"{from_name}\"> has no <Label> to detect; add one "
                                  f"(<Label value=\"cat\"/>); labels loaded from task data are not supported.")
    prompt = next((tag.get("name") for tag in tags if tag.tag.lower() == "textarea" and tag.get("name")
                   and to_name in [name.strip() for name in (tag.get("toName") or "").split(",")]), None)
    number = next((tag for tag in tags if tag.tag.lower() == "number" and tag.get("name") == MIN_SCORE_CONTROL), None)
    if number is None:
        return DetectionConfig(from_name, to_name, value[1:], labels, prompt, region_type=region_type)
    default = number.get("defaultValue")
    where = f'<Number name="{MIN_SCORE_CONTROL}">\'s defaultValue'
    return DetectionConfig(from_name, to_name, value[1:], labels, prompt, MIN_SCORE_CONTROL,
                           None if default is None else checked_min_score(default, where), region_type)


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


def min_score(config: DetectionConfig, context: dict[str, Any] | None, default: float) -> float:
    """The score under which boxes are dropped: the annotator's value in the `<Number name="min_score">` control
    (interactive pre-annotation), else that control's defaultValue, else `default` (the service's).

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

