"""The benchmark metrics on hand-worked boxes: every figure below is worked out by hand in its comment."""

import pytest

from kosmos_serve.evaluation.backends import Generation
from kosmos_serve.evaluation.metrics import (
    RecallTally,
    best_ious,
    first_box_hit,
    iou,
    recall_at_k,
    xywh_to_xyxy,
)
from kosmos_serve.evaluation.report import format_table
from kosmos_serve.evaluation.runner import predicted_boxes

TRUTH = (0, 0, 100, 100)  # area 10,000


def test_iou_worked_examples():
    assert iou((0, 0, 100, 50), TRUTH) == 0.5  # 5,000 inside / 10,000
    assert iou((0, 0, 100, 49), TRUTH) == pytest.approx(0.49)  # 4,900 / 10,000
    assert iou((50, 0, 150, 100), TRUTH) == pytest.approx(1 / 3)  # 5,000 / (10,000 + 10,000 - 5,000)
    assert iou((200, 200, 300, 300), TRUTH) == 0.0


def test_coco_boxes_become_corners():
    assert xywh_to_xyxy([103.93, 299.99, 134.22, 177.42]) == pytest.approx((103.93, 299.99, 238.15, 477.41))


def test_a_hit_and_a_miss_at_iou_049():
    assert first_box_hit([(0, 0, 100, 50)], TRUTH)  # IoU 0.50: a hit (>= 0.5)
    assert not first_box_hit([(0, 0, 100, 49)], TRUTH)  # IoU 0.49: a miss


def test_accuracy_takes_the_first_box_only():
    assert not first_box_hit([(0, 0, 100, 49), (0, 0, 100, 100)], TRUTH)  # the exact box came second: a miss
    assert not first_box_hit([], TRUTH)  # no box for the phrase: a miss (the original's 0-area box)


def test_a_phrase_with_two_true_boxes_is_found_by_either():
    two_men = [(0, 0, 100, 100), (300, 0, 400, 100)]
    assert recall_at_k([(300, 0, 400, 60)], two_men, k=1)  # IoU 0.6 with the second man
    assert recall_at_k([(0, 0, 100, 60)], two_men, k=1)  # IoU 0.6 with the first
    assert not recall_at_k([(0, 0, 400, 100)], two_men, k=1)  # one box around both: 10,000 / 40,000 each
    assert best_ious([(300, 0, 400, 60)], two_men) == [pytest.approx(0.6)]


def test_recall_at_5_counts_a_later_box():
    predicted = [(500, 500, 600, 600), (400, 400, 450, 450), (0, 0, 100, 60), *[(900, 900, 950, 950)] * 4]
    assert not recall_at_k(predicted, [TRUTH], k=1)  # the first box misses
    assert recall_at_k(predicted, [TRUTH], k=5)  # the third has IoU 0.6
    assert recall_at_k(predicted, [TRUTH], k=10)
    assert not recall_at_k(predicted[3:] + predicted[:3], [TRUTH], k=5)  # ... but not when it is the 7th
    assert recall_at_k(predicted[3:] + predicted[:3], [TRUTH], k=10)


def test_recall_tally_counts_each_type_and_all():
    tally = RecallTally()
    tally.add({1: True, 5: True, 10: True}, ["people"])
    tally.add({1: False, 5: True, 10: True}, ["people", "clothing"])
    tally.add({1: False, 5: False, 10: False}, ["scene"])
    assert tally.categories() == ["all", "clothing", "people", "scene"]
    assert tally.recall(1) == pytest.approx(1 / 3) and tally.recall(5) == pytest.approx(2 / 3)
    assert tally.recall(1, "people") == 0.5 and tally.recall(5, "people") == 1.0
    assert tally.recall(1, "clothing") == 0.0 and tally.recall(10, "clothing") == 1.0
    assert tally.recall(1, "animals") == 0.0  # a type never seen


def test_predicted_boxes_are_the_phrases_own_in_pixels_in_order():
    generation = Generation(
        raw_text="",
        entities=(("A man", ((0.0, 0.0, 0.5, 0.5),)),
                  ("a dog", ((0.5, 0.5, 1.0, 1.0),)),
                  ("A man", ((0.25, 0.25, 0.75, 0.75), (0.0, 0.5, 0.5, 1.0)))),  # named again, with two boxes
        image_size=(640, 480),
    )
    assert predicted_boxes(generation, "A man") == [(0.0, 0.0, 320.0, 240.0), (160.0, 120.0, 480.0, 360.0),
                                                    (0.0, 240.0, 320.0, 480.0)]
    assert predicted_boxes(generation, "a cat") == []


def test_table_aligns_numbers():
    assert format_table([("benchmark", "acc@0.5", "paper"), ("refcoco", 52.321, 52.32), ("refcocog", None, 60.57)],
                        left=1) == ("benchmark  acc@0.5  paper\n"
                                    "refcoco      52.32  52.32\n"
                                    "refcocog         -  60.57")
