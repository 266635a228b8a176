"""Grounded JSONL records -> training examples, against worked examples and transformers' own parser."""

import json

import pytest
from PIL import Image
from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

from kosmos_serve.training.records import DataError, Example, box_tokens, grounded_caption, read_examples

# On a 320x240 image: pixel box [40, 60, 120, 180] is (0.125, 0.25, 0.375, 0.75), cells (4, 8)..(11, 23);
# [160, 120, 320, 240] is (0.5, 0.5, 1.0, 1.0), cells (16, 16)..(31, 31).
CIRCLE_BOX, SQUARE_BOX = [40, 60, 120, 180], [160, 120, 320, 240]
CIRCLE_TOKENS = "<object><patch_index_0260><patch_index_0747></object>"
SQUARE_TOKENS = "<object><patch_index_0528><patch_index_1023></object>"
CAPTION = "An image of a red circle and a blue square."


@pytest.fixture
def folder(tmp_path):
    """A folder holding images/scene.png (320x240) for records to point at."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (320, 240), (200, 200, 200)).save(tmp_path / "images" / "scene.png")
    return tmp_path


def write_records(folder, *records) -> str:
    """A records.jsonl in `folder`: dicts are dumped as JSON, strings written as they are."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path = folder / "records.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def only_example(folder, record) -> Example:
    examples = read_examples(write_records(folder, record))
    assert len(examples) == 1
    return examples[0]


def caption_record(**changes):
    spans = [{"start": 12, "end": 24, "boxes": [CIRCLE_BOX]}, {"start": 29, "end": 42, "boxes": [SQUARE_BOX]}]
    return {"image": "images/scene.png", "caption": CAPTION, "spans": spans, **changes}


def test_caption_record_becomes_grounded_caption_after_grounding_tag(folder):
    example = only_example(folder, caption_record())
    assert example == Example(
        image_path=folder / "images" / "scene.png",
        prompt="<grounding>",
        target=f" An image of<phrase> a red circle</phrase>{CIRCLE_TOKENS} and<phrase> a blue square</phrase>"
        f"{SQUARE_TOKENS}.",
        kind="caption",
    )


def test_caption_target_parses_back_to_the_caption_and_its_spans_with_transformers(folder):
    example = only_example(folder, caption_record())
    text, entities = clean_text_and_extract_entities_with_bboxes(example.prompt + example.target)
    assert text == CAPTION
    assert [(name, span) for name, span, _ in entities] == [
        ("a red circle", (12, 24)),
        ("a blue square", (29, 42)),
    ]


def test_referring_record_gives_the_phrase_and_asks_for_its_box(folder):
    record = {"image": "images/scene.png", "task": "referring", "expression": " the red circle "}
    example = only_example(folder, {**record, "boxes": [CIRCLE_BOX]})
    assert (example.prompt, example.target, example.kind) == (
        "<grounding><phrase> the red circle</phrase>",
        CIRCLE_TOKENS,
        "referring",
    )


def test_region_record_gives_the_box_and_asks_for_its_description(folder):
    record = {"image": "images/scene.png", "task": "region", "boxes": [CIRCLE_BOX]}
    example = only_example(folder, {**record, "description": "  a red circle "})
    assert (example.prompt, example.target, example.kind) == (
        f"<grounding><phrase> It</phrase>{CIRCLE_TOKENS} is",
        " a red circle",
        "region",
    )


def test_normalised_boxes_give_the_same_tokens_as_pixel_boxes(folder):
    pixel = only_example(folder, caption_record())
    spans = [
        {"start": 12, "end": 24, "boxes": [[0.125, 0.25, 0.375, 0.75]]},
        {"start": 29, "end": 42, "boxes": [[0.5, 0.5, 1, 1]]},
    ]
    normalised = only_example(folder, caption_record(spans=spans, box_units="normalized"))
    assert normalised.target == pixel.target


def test_pixel_boxes_use_the_size_of_the_exif_rotated_image(folder):
    # Stored 320x240, orientation 6 (rotate 90 degrees): a viewer sees 240x320.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (320, 240), (200, 200, 200)).save(folder / "rotated.jpg", exif=exif)
    record = {"image": "rotated.jpg", "task": "referring", "expression": "a", "boxes": [[60, 80, 180, 240]]}
    # (60/240, 80/320, 180/240, 240/320) = (0.25, 0.25, 0.75, 0.75): cells (8, 8)..(23, 23).
    assert only_example(folder, record).target == "<object><patch_index_0264><patch_index_0759></object>"
    # The whole viewed image fits, though it would not in the stored orientation.
    whole = only_example(folder, {**record, "boxes": [[0, 0, 240, 320]]})
    assert whole.target == "<object><patch_index_0000><patch_index_1023></object>"


def test_several_boxes_of_one_phrase_are_joined_by_the_delimiter(folder):
    spans = [{"start": 12, "end": 24, "boxes": [CIRCLE_BOX, SQUARE_BOX]}]
    example = only_example(folder, caption_record(spans=spans))
    assert example.target == (
        " An image of<phrase> a red circle</phrase><object><patch_index_0260><patch_index_0747>"
        "</delimiter_of_multi_objects/><patch_index_0528><patch_index_1023></object> and a blue square."
    )


def test_grit_record_merges_chunks_on_one_span_and_makes_a_referring_example_per_ref_exp(folder):
    Image.new("RGB", (500, 400)).save(folder / "000012.jpg")
    record = {
        "key": "000012",
        "caption": "two dogs and a cat on a sofa",
        "width": 500,
        "height": 400,
        "noun_chunks": [
            [0, 8, 0.125, 0.25, 0.375, 0.75, 0.9],
            [13, 18, 0.5, 0.5, 1.0, 1.0, 0.8],
            [0, 8, 0.5, 0.5, 1.0, 1.0, 0.7],
        ],
        "ref_exps": [[13, 28, 0.5, 0.5, 1.0, 1.0, 0.6]],
    }
    caption, referring = read_examples(write_records(folder, record))
    assert caption.image_path == folder / "000012.jpg"
    assert (caption.prompt, caption.kind) == ("<grounding>", "caption")
    assert caption.target == (
        "<phrase> two dogs</phrase><object><patch_index_0260><patch_index_0747></delimiter_of_multi_objects/>"
        f"<patch_index_0528><patch_index_1023></object> and<phrase> a cat</phrase>{SQUARE_TOKENS} on a sofa"
    )
    assert (referring.prompt, referring.target, referring.kind) == (
        "<grounding><phrase> a cat on a sofa</phrase>",
        SQUARE_TOKENS,
        "referring",
    )


def test_blank_lines_are_skipped(folder):
    good = json.dumps(caption_record())
    path = write_records(folder, "", good, "   ", "", good, "")
    assert [e.kind for e in read_examples(path)] == ["caption", "caption"]


def test_every_bad_line_is_reported_with_its_number_and_reason(folder):
    referring = {"image": "images/scene.png", "task": "referring", "expression": "the red circle"}
    overlapping = [{"start": s, "end": s + 12, "boxes": [CIRCLE_BOX]} for s in (12, 20)]
    path = write_records(
        folder,
        caption_record(),  # line 1: good
        "",  # line 2: blank
        '{"image": "images/scene.png", "caption": ',  # 3
        {**referring, "boxes": [[10, 5, 3, 9]]},  # 4
        {**referring, "task": "detect", "boxes": [CIRCLE_BOX]},  # 5
        {**referring, "image": "images/missing.png", "boxes": [CIRCLE_BOX]},  # 6
        caption_record(spans=[{"start": 30, "end": 60, "boxes": [CIRCLE_BOX]}]),  # 7
        caption_record(caption="   "),  # 8
        {**referring, "boxes": [[0, 0, 321, 240]]},  # 9
        '{"image": "images/scene.png", "task": "region", "boxes": [[NaN, 0, 1, 1]]}',  # 10
        caption_record(spans=overlapping),  # 11
        referring,  # 12
        {**referring, "boxes": [CIRCLE_BOX]},  # 13: good
    )
    with pytest.raises(DataError) as raised:
        read_examples(path)
    message = raised.value.message
    assert raised.value.status == 422 and raised.value.code == "invalid_data"
    assert "records.jsonl line 3: invalid JSON" in message
    assert "records.jsonl line 4: box [10, 5, 3, 9] is inverted" in message
    assert "records.jsonl line 5: unknown task 'detect'" in message
    assert "records.jsonl line 6: image images/missing.png not found" in message
    assert "records.jsonl line 7: span 30..60 is empty or outside the caption" in message
    assert "records.jsonl line 8: field 'caption' must be non-empty text" in message
    assert "records.jsonl line 9: box [0, 0, 321, 240] lies outside the 320x240 image" in message
    assert "records.jsonl line 10: box [NaN, 0, 1, 1] is not four finite numbers" in message
    assert "records.jsonl line 11: span 20..32 overlaps" in message
    assert 'records.jsonl line 12: field "boxes" must be a non-empty list' in message
    assert "line 1:" not in message and "line 2:" not in message and "line 13:" not in message
    assert message.startswith("10 bad record(s)")


def test_a_long_list_of_bad_lines_is_cut_after_twenty(folder):
    path = write_records(folder, *["not json"] * 25)
    with pytest.raises(DataError) as raised:
        read_examples(path)
    assert "records.jsonl line 20:" in raised.value.message
    assert "line 21:" not in raised.value.message
    assert raised.value.message.endswith("... and 5 more")


def test_span_with_surrounding_space_is_refused():
    with pytest.raises(ValueError, match="whitespace"):
        grounded_caption(CAPTION, [(11, 24, [(0.1, 0.1, 0.2, 0.2)])])


def test_box_tokens_of_the_model_card_snowman():
    # The model card's snowman box, (0.390625, 0.046875, 0.984375, 0.828125), is cells 44..863.
    assert box_tokens([(0.390625, 0.046875, 0.984375, 0.828125)]) == (
        "<object><patch_index_0044><patch_index_0863></object>"
    )
