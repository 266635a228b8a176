"""Prompt templates per task, and the validation of their inputs."""

import pytest

from kosmos_serve.errors import InvalidBoxError, InvalidRequestError
from kosmos_serve.tasks import TaskInput, build_prompts, validate_box


def prompts(task, width=640, height=480, **inputs):
    return build_prompts(TaskInput(task=task, **inputs), width, height)


def test_model_card_prompts_are_reproduced_exactly():
    assert prompts("caption")[0].text == "<grounding> An image of"
    assert prompts("detailed_caption")[0].text == "<grounding> Describe this image in detail:"
    assert prompts("phrase_grounding", phrases=("a snowman",))[0].text == "<grounding><phrase> a snowman</phrase>"
    assert (
        prompts("referring_comprehension", phrases=("a snowman next to a fire",))[0].text
        == "<grounding><phrase> a snowman next to a fire</phrase>"
    )
    assert (
        prompts("grounded_vqa", prompt="What is special about this image?")[0].text
        == "<grounding> Question: What is special about this image? Answer:"
    )


def test_region_vqa_wraps_the_phrase_like_the_model_card_and_normalises_its_box():
    (spec,) = prompts("region_vqa", prompt="Where is the fire next to?", phrases=("the fire",), boxes=((110, 7, 310, 427),))
    assert spec.text == "<grounding> Question: Where is<phrase> the fire</phrase> next to? Answer:"
    assert spec.bboxes == ([(110 / 640, 7 / 480, 310 / 640, 427 / 480)],)


def test_referring_generation_puts_all_boxes_on_it():
    (spec,) = prompts("referring_generation", boxes=((0, 0, 320, 240), (320, 240, 640, 480)))
    assert spec.text == "<grounding><phrase> It</phrase> is"
    assert spec.bboxes == ([(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)],)


def test_detection_is_one_prompt_per_phrase():
    specs = prompts("detection", phrases=("a dog", " a cat "))
    assert [(s.text, s.phrase) for s in specs] == [
        ("<grounding><phrase> a dog</phrase>", "a dog"),
        ("<grounding><phrase> a cat</phrase>", "a cat"),
    ]


def test_raw_prompt_gets_grounding_only_when_asked():
    assert prompts("raw", prompt="An image of")[0].text == "<grounding> An image of"
    assert prompts("raw", prompt="An image of", grounding=False)[0].text == "An image of"
    assert prompts("raw", prompt="<grounding> An image of")[0].text == "<grounding> An image of"
    (spec,) = prompts("raw", prompt="<grounding><phrase> It</phrase> is", boxes=((0, 0, 64, 48),))
    assert spec.bboxes == ([(0.0, 0.0, 0.1, 0.1)],)


@pytest.mark.parametrize(
    "box, message",
    [
        ((10, 10, 5, 20), "inverted"),
        ((10, 10, 20, 10), "inverted"),
        ((-1, 0, 20, 20), "outside"),
        ((0, 0, 641, 20), "outside"),
        ((0, 0, 20, 481), "outside"),
        ((0, 0, 20), "four finite numbers"),
        ((0, 0, float("nan"), 20), "four finite numbers"),
    ],
)
def test_bad_boxes_say_what_is_wrong(box, message):
    with pytest.raises(InvalidBoxError, match=message):
        validate_box(box, 640, 480)


@pytest.mark.parametrize(
    "task, inputs, message",
    [
        ("nonsense", {}, "Unknown task 'nonsense'; choose one of: caption"),
        ("phrase_grounding", {}, "exactly one phrase"),
        ("phrase_grounding", {"phrases": ("a", "b")}, "exactly one phrase"),
        ("referring_comprehension", {"phrases": ("  ",)}, "empty"),
        ("referring_generation", {}, "at least one box"),
        ("grounded_vqa", {}, "needs a question"),
        ("region_vqa", {"prompt": "Where is it?", "phrases": ("it",)}, "one box per phrase"),
        ("region_vqa", {"prompt": "Where is it?", "phrases": ("dog",), "boxes": ((0, 0, 9, 9),)}, "does not occur"),
        ("detection", {}, "at least one phrase"),
        ("detection", {"phrases": ("a <tag>",)}, "reserves for its tags"),
        ("raw", {}, "needs a prompt"),
        ("raw", {"prompt": "no phrase here", "boxes": ((0, 0, 9, 9),)}, "0 <phrase>"),
        ("caption", {"boxes": ((0, 0, 9, 9),)}, r"Task 'caption' does not use boxes \(it takes no inputs\)\.$"),
        ("caption", {"prompt": "<grounding> Describe this image:"}, "does not use prompt .*use task 'raw'"),
        ("phrase_grounding", {"phrases": ("a",), "prompt": "Hi"}, r"does not use prompt \(it takes phrases\)"),
        ("grounded_vqa", {"prompt": "Why?", "phrases": ("a",), "grounding": False},
         r"does not use phrases or grounding \(it takes prompt\)"),
    ],
)
def test_bad_task_inputs_say_what_is_missing(task, inputs, message):
    with pytest.raises(InvalidRequestError, match=message):
        prompts(task, **inputs)



@pytest.mark.parametrize(
    "task, inputs, field",
    [
        ("nonsense", {}, "task"),
        ("phrase_grounding", {}, "phrases"),
        ("detection", {"phrases": ("a <tag>",)}, "phrases"),
        ("region_vqa", {"prompt": "Where is it?"}, "phrases"),
        ("region_vqa", {"prompt": "Where is it?", "phrases": ("it",)}, "boxes"),
        ("referring_generation", {}, "boxes"),
        ("referring_generation", {"boxes": ((0, 0, 641, 20),)}, "boxes"),
        ("grounded_vqa", {}, "prompt"),
        ("raw", {}, "prompt"),
    ],
)
def test_an_input_at_fault_is_named_by_its_field_never_by_a_flag(task, inputs, field):
    with pytest.raises((InvalidRequestError, InvalidBoxError)) as raised:
        prompts(task, **inputs)
    assert raised.value.field == field
    assert "--" not in raised.value.message and str(raised.value) == f"{field}: {raised.value.message}"
    assert raised.value.naming({"phrases": "--phrase", "boxes": "--box", "prompt": "--prompt", "task": "--task"}) \
        .startswith("--")
