"""Format functions against the model card's worked examples and transformers' own parser."""

import pytest
from transformers.models.kosmos2.processing_kosmos2 import (
    coordinate_to_patch_index,
    patch_index_to_coordinate,
)

from kosmos_serve.grounding import parse_generation, render_markdown, to_pixel_box

SNOWMAN_DECODED = (
    "<image>. the, to and of as in I that' for is was- on’ it with The as at bet he s</image>"
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
    " warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
)


def test_model_card_snowman_caption_is_parsed_exactly():
    parsed = parse_generation(SNOWMAN_DECODED, "<grounding> An image of", 640, 480)
    assert parsed.raw_text == (
        "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
        " warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
    )
    assert parsed.text == "An image of a snowman warming himself by a fire."
    assert [e.as_reference() for e in parsed.entities] == [
        ("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)]),
        ("a fire", (41, 47), [(0.171875, 0.015625, 0.484375, 0.890625)]),
    ]
    assert parsed.entities[0].pixel_boxes == ((250, 22, 630, 397),)
    assert parsed.answer == "a snowman warming himself by a fire."
    assert parsed.markdown == (
        "An image of [a snowman](#box=250,22,630,397) warming himself by [a fire](#box=110,7,310,427)."
    )


def test_model_card_region_vqa_keeps_both_entities_and_strips_the_question():
    raw = (
        "<grounding> Question: Where is<phrase> the fire</phrase><object><patch_index_0005><patch_index_0911>"
        "</object> next to? Answer: Near<phrase> the snowman</phrase><object><patch_index_0044><patch_index_0863>"
        "</object>."
    )
    prompt = (
        "<grounding> Question: Where is<phrase> the fire</phrase><object><patch_index_0005><patch_index_0911>"
        "</object> next to? Answer:"
    )
    parsed = parse_generation("<image>x</image>" + raw, prompt, 100, 100)
    assert parsed.text == "Question: Where is the fire next to? Answer: Near the snowman."
    assert [e.as_reference() for e in parsed.entities] == [
        ("the fire", (19, 27), [(0.171875, 0.015625, 0.484375, 0.890625)]),
        ("the snowman", (50, 61), [(0.390625, 0.046875, 0.984375, 0.828125)]),
    ]
    assert parsed.answer == "Near the snowman."


def test_several_boxes_for_one_phrase_and_an_object_without_phrase():
    raw = (
        "<grounding> Two<phrase> dogs</phrase><object><patch_index_0000><patch_index_0033>"
        "</delimiter_of_multi_objects/><patch_index_0990><patch_index_1023></object> and"
        "<object><patch_index_0044><patch_index_0044></object>"
    )
    parsed = parse_generation(raw, "<grounding>", 320, 320)
    dogs, bare = parsed.entities
    assert dogs.phrase == "dogs" and len(dogs.boxes) == 2
    assert dogs.pixel_boxes == ((5, 5, 15, 15), (305, 305, 315, 315))
    assert bare.phrase == "<patch_index_44><patch_index_44>" and bare.span[0] == bare.span[1]
    assert bare.pixel_boxes == ((120, 10, 130, 20),)
    assert parsed.markdown == "Two [dogs](#box=5,5,15,15;305,305,315,315) and"


@pytest.mark.parametrize("index_pair", [(0, 1023), (44, 863), (5, 911), (33, 33), (100, 170), (992, 1023)])
def test_patch_tokens_to_box_and_back_are_the_same_tokens(index_pair):
    box = patch_index_to_coordinate(*index_pair, 32)
    assert coordinate_to_patch_index(box, 32) == index_pair


def test_pixel_boxes_scale_by_the_original_size_not_224():
    assert to_pixel_box((0.5, 0.25, 1.0, 1.0), 1000, 400) == (500, 100, 1000, 400)


def test_markdown_without_entities_is_the_text():
    assert render_markdown("plain words", ()) == "plain words"
