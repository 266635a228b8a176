"""OCR metrics on worked examples, exact values: page CER and WER in the order read, lines matched one to one by box
IoU >= 0.5, pooled over pages; and a perfect reading of the synthetic pages scoring perfectly."""

import json

import pytest

from kosmos_serve.evaluation.backends import Generation
from kosmos_serve.evaluation.datasets import Split
from kosmos_serve.evaluation.ocr_metrics import PageCounts, match_lines, score_page
from kosmos_serve.evaluation.ocr_pages import ocr_record, read_pages
from kosmos_serve.evaluation.report import format_table, ocr_row
from kosmos_serve.evaluation.runner import Settings, SplitResult
from kosmos_serve.training.pages import write_pages_dataset

TOP, BOTTOM = (10, 10, 200, 30), (10, 40, 120, 60)


def figures(counts: PageCounts) -> tuple:
    return counts.cer, counts.wer, counts.precision, counts.recall, counts.f1, counts.matched_cer


def test_a_wrong_letter_and_a_wrong_word():
    truth = [("the red door", TOP), ("is open", BOTTOM)]  # "the red door\nis open": 20 characters, 5 words
    counts, matches = score_page([("the red dor", TOP), ("is opened", BOTTOM)], truth)
    assert counts == PageCounts(characters=20, character_edits=3, words=5, word_edits=2, predicted_lines=2,
                                true_lines=2, matched_lines=2, matched_characters=19, matched_character_edits=3)
    assert figures(counts) == (0.15, 0.4, 1.0, 1.0, 1.0, 3 / 19)
    assert matches == [(0, 0, 1.0), (1, 1, 1.0)]


def test_the_page_text_is_read_in_the_order_listed_while_line_matching_ignores_order():
    counts, matches = score_page([("cd", BOTTOM), ("ab", TOP)], [("ab", TOP), ("cd", BOTTOM)])
    assert (counts.character_edits, counts.characters, counts.word_edits, counts.words) == (4, 5, 2, 2)
    assert figures(counts) == (0.8, 1.0, 1.0, 1.0, 1.0, 0.0)
    assert matches == [(0, 1, 1.0), (1, 0, 1.0)]


def test_whitespace_runs_and_ends_do_not_count_but_case_and_punctuation_do():
    truth = [("Total: 50,000", TOP)]
    assert score_page([("  Total:   50,000 ", TOP)], truth)[0].cer == 0.0
    assert score_page([("total: 50.000", TOP)], truth)[0].character_edits == 2


def test_a_line_is_matched_once_at_iou_of_one_half_or_more():
    assert match_lines([(0, 0, 10, 10)], [(0, 0, 10, 5)]) == [(0, 0, 0.5)]
    assert match_lines([(0, 0, 10, 10)], [(0, 0, 10, 4.9)]) == []
    counts, matches = score_page([("a", TOP), ("a", (10, 10, 200, 29))], [("a", TOP)])  # read twice
    assert matches == [(0, 0, 1.0)] and figures(counts)[2:5] == (0.5, 1.0, 2 / 3)


def test_the_highest_iou_is_matched_first():
    predicted = [(0, 0, 10, 10), (0, 0, 10, 8)]
    truth = [(0, 0, 10, 9), (0, 0, 10, 10)]  # IoUs: 0.9 and 1.0 for the first; 8/9 and 0.8 for the second
    assert match_lines(predicted, truth) == [(0, 1, 1.0), (1, 0, 8 / 9)]


def test_lines_read_elsewhere_count_against_detection_but_not_the_matched_lines_cer():
    truth = [("the red door", TOP), ("is open", BOTTOM)]
    counts, _ = score_page([("the red door", TOP), ("is open", (300, 40, 410, 60))], truth)
    assert figures(counts) == (0.0, 0.0, 0.5, 0.5, 0.5, 0.0)
    assert counts.matched_characters == 12


def test_nothing_read_and_nothing_to_read():
    truth = [("the red door", TOP), ("is open", BOTTOM)]
    assert figures(score_page([], truth)[0]) == (1.0, 1.0, None, 0.0, None, None)
    assert figures(score_page([("noise", TOP)], [])[0]) == (None, None, 0.0, None, None, None)
    assert figures(score_page([], [])[0]) == (None,) * 6


def test_pages_are_pooled_not_averaged():
    first, _ = score_page([("the red dor", TOP)], [("the red door", TOP)])  # 1 edit of 12 characters
    second, _ = score_page([], [("open", TOP), ("7", BOTTOM)])  # 6 of 6, no line found
    total = sum([first, second], PageCounts())
    assert (total.character_edits, total.characters, total.true_lines, total.matched_lines) == (7, 18, 3, 1)
    assert figures(total) == (7 / 18, 3 / 5, 1.0, 1 / 3, 0.5, 1 / 12)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    path = write_pages_dataset(tmp_path_factory.mktemp("pages"), 8, seed=1)
    return path, read_pages(path, path.parent)


def test_a_perfect_reading_of_the_synthetic_pages_is_perfect(pages):
    _, examples = pages
    for example in examples:
        counts, matches = score_page(example.truth, example.truth)
        assert figures(counts) == (0.0, 0.0, 1.0, 1.0, 1.0, 0.0)
        assert matches == [(i, i, 1.0) for i in range(len(example.truth))]


def test_a_perfect_reading_reports_perfect_figures(pages):
    path, examples = pages
    split = Split("ocr", path, path.parent, examples, len(examples))
    settings = Settings("perfect", 1024, 0, "ocr lines")
    records = [ocr_record(split, example, Generation("", (), (0, 0), lines=example.truth), settings)
               for example in examples]
    truth = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["lines"] for r in records] == [r["truth"] for r in records] == [
        [{"text": line["text"], "box": line["box"]} for line in page["lines"]] for page in truth]
    row = format_table([ocr_row(SplitResult(split, records))], left=2)
    assert row.split() == ["ocr", "pages", "0.00", "0.00", "100.00", "100.00", "100.00", "0.00", "8", "0"]
