"""Kosmos-2.5's readings: lines and boxes parsed and scaled as transformers' model doc does, on worked examples."""

import pytest

from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.grounding import TextLine
from kosmos_serve.ocr import parse_reading, read_lines, resized_size, scale_coordinate
from kosmos_serve.tasks import Task, TaskInput, build_prompts

# The model doc's receipt reading (its first lines), as decoded: the prompt, then a box before each line.
RECEIPT = ("<ocr><bbox><x_53><y_573><x_69><y_606></bbox>1\n<bbox><x_79><y_573><x_464><y_612></bbox>[REG] BLACK SAKURA\n"
           "<bbox><x_690><y_569><x_810><y_606></bbox>45,455\n")


def test_the_receipt_reads_as_lines_with_boxes_in_the_original_pixels():
    # an 864 x 1296 photo is resized to 832 x 1248 (52 x 78 = 4056 patches): boxes scale by 864/832 = 1296/1248
    assert resized_size(864, 1296) == (832, 1248)
    reading = parse_reading(RECEIPT, "<ocr>", 864, 1296)
    assert reading.lines == (
        TextLine("1", (55, 595, 71, 629)),
        TextLine("[REG] BLACK SAKURA", (82, 595, 481, 635)),
        TextLine("45,455", (716, 590, 841, 629)),
    )
    assert reading.text == reading.answer == "1\n[REG] BLACK SAKURA\n45,455\n"
    assert reading.raw_text == RECEIPT
    assert reading.markdown == ("[1](#box=55,595,71,629)\n[[REG] BLACK SAKURA](#box=82,595,481,635)\n"
                                "[45,455](#box=716,590,841,629)")
    assert reading.entities == ()


def test_a_page_the_size_it_is_resized_to_keeps_its_coordinates():
    assert resized_size(1024, 1024) == (1024, 1024)
    assert read_lines("<bbox><x_0><y_7><x_1023><y_1024></bbox>edge to edge", 1024, 1024) == (
        TextLine("edge to edge", (0, 7, 1023, 1024)),)


@pytest.mark.parametrize(("text", "lines"), [
    ("no boxes at all", ()),
    ("a heading<bbox><x_10><y_10><x_20><y_20></bbox>first", (TextLine("first", (10, 10, 20, 20)),)),  # before: no line
    ("<bbox><x_20><y_10><x_20><y_20></bbox>flat\n<bbox><x_20><y_20><x_30><y_10></bbox>upside down\n", ()),
    ("<bbox><x_1><y_1><x_2><y_2></bbox><bbox><x_3><y_3><x_4><y_4></bbox>two boxes, one text",
     (TextLine("", (1, 1, 2, 2)), TextLine("two boxes, one text", (3, 3, 4, 4)))),
    ("<bbox><x_1><y_1><x_2><y_2></bbox>kept\n\n", (TextLine("kept\n", (1, 1, 2, 2)),)),  # one line break is the end
    ("<bbox><x_1><y_1><x_2></bbox>half a box", ()),
])
def test_lines_are_the_docs(text, lines):
    assert read_lines(text, 1024, 1024) == lines


def test_coordinates_scale_in_float32_as_the_docs_tensors_do():
    # 26 * 480 / 832 is exactly 15; in float64, 26 * (480 / 832) is 14.999999999999998
    assert scale_coordinate(26, 480, 832) == 15
    assert int(26 * (480 / 832)) == 14
    # the doc's 480 / tensor([880]) is torch's reciprocal(880) * 480 in float32: 0.54545450, under 6/11; 880 -> 479
    assert scale_coordinate(880, 480, 880) == 479
    assert [scale_coordinate(c, 200, 832) for c in (0, 1, 415, 416, 832)] == [0, 0, 99, 100, 200]


def test_the_prompt_is_removed_wherever_it_occurs():
    reading = parse_reading("<ocr><bbox><x_1><y_1><x_9><y_9></bbox>say <ocr> twice", "<ocr>", 1024, 1024)
    assert reading.lines == (TextLine("say  twice", (1, 1, 9, 9)),)
    assert reading.raw_text == "<ocr><bbox><x_1><y_1><x_9><y_9></bbox>say <ocr> twice"


def test_markdown_is_kept_as_written():
    reading = parse_reading("<md># Receipt\n\n| item | price |\n| --- | --- |\n<bbox>", "<md>", 864, 1296)
    assert reading.text == reading.answer == reading.markdown == "# Receipt\n\n| item | price |\n| --- | --- |\n<bbox>"
    assert reading.lines == () and reading.raw_text.startswith("<md>")


def test_kosmos_2_5_tasks_send_the_model_docs_prompts():
    assert build_prompts(TaskInput(Task.OCR), 640, 480)[0].text == "<ocr>"
    assert build_prompts(TaskInput(Task.MARKDOWN), 640, 480)[0].text == "<md>"
    with pytest.raises(InvalidRequestError, match="does not use prompt"):
        build_prompts(TaskInput(Task.OCR, prompt="read this"), 640, 480)
