"""The detection benchmark's figures against values worked out by hand: AUROC, the threshold table, COCOeval's AP with
the scores and with every score 1.0 (through the runner and the report, a backend standing in for the model)."""

import itertools
import json
import random
import re

import pytest
from PIL import Image

from kosmos_serve.evaluation.backends import Generation
from kosmos_serve.evaluation.detection import read_detection_splits
from kosmos_serve.evaluation.detection_metrics import auroc, summarise
from kosmos_serve.evaluation.report import format_report
from kosmos_serve.evaluation.runner import PredictionLog, Settings, run

SETTINGS = Settings("stand-in", 16, 3, "coco")


@pytest.mark.parametrize(("positives", "negatives", "expected"), [
    ([0.9, 0.8], [0.1, 0.85], 3 / 4),  # 0.8 < 0.85 is the one pair out of order
    ([1.0, 0.5], [0.5, 0.0], 3.5 / 4),  # the tie 0.5 = 0.5 counts half
    ([0.9, 0.7, 0.7], [0.7, 0.1], 5 / 6),  # two ties of 0.7 with 0.7
    ([0.2], [0.2], 0.5),
    ([0.6, 0.9], [0.1, 0.5], 1.0),
    ([0.1, 0.5], [0.6, 0.9], 0.0),
    ([0.0, 0.0, 0.3], [0.0, 0.0], (0.5 * 4 + 2) / 6),  # phrases without a box score 0: ties
])
def test_auroc_is_the_share_of_pairs_in_order(positives, negatives, expected):
    assert auroc(positives, negatives) == pytest.approx(expected)


def test_auroc_has_no_value_without_both_kinds():
    assert auroc([0.4], []) is None and auroc([], [0.4]) is None


def test_auroc_by_ranks_equals_counting_every_pair():
    rng = random.Random(3)
    for _ in range(20):
        positives = [rng.choice((0.0, 0.25, 0.5, 0.75, 1.0, rng.random())) for _ in range(rng.randint(1, 30))]
        negatives = [rng.choice((0.0, 0.25, 0.5, rng.random())) for _ in range(rng.randint(1, 30))]
        pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives))
        assert auroc(positives, negatives) == pytest.approx(pairs / (len(positives) * len(negatives)))


class StandIn:
    """A backend answering each image's detection from a table: phrase -> [(pixel box, score)]."""

    def __init__(self, answers: dict[str, dict[str, list]]):
        self.answers, self.model, self.asked = answers, "stand-in", []

    def generate(self, examples):
        outcomes = []
        for example in examples:
            self.asked.append((example.file_name, example.phrases))
            width, height = Image.open(example.image_path).size
            found = [(phrase, answers) for phrase, answers in self.answers[example.file_name].items()
                     if phrase in example.phrases and answers]
            entities = tuple((phrase, tuple((x1 / width, y1 / height, x2 / width, y2 / height)
                                            for (x1, y1, x2, y2), _ in answers)) for phrase, answers in found)
            scores = tuple(tuple(score for _, score in answers) for _, answers in found)
            outcomes.append(Generation("", entities, (width, height), scores))
        return outcomes


@pytest.fixture
def two_cats(tmp_path):
    """Two 200x100 images, a cat in each; "a dog" is a category too, in neither."""
    for name in ("one.png", "two.png"):
        Image.new("RGB", (200, 100), "white").save(tmp_path / name)
    truth = {
        "images": [{"id": 1, "file_name": "one.png"}, {"id": 2, "file_name": "two.png"}],
        "categories": [{"id": 7, "name": "a cat"}, {"id": 9, "name": "a dog"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40]},
                        {"id": 2, "image_id": 2, "category_id": 7, "bbox": [20, 20, 40, 60]}],
    }
    (tmp_path / "cats.json").write_text(json.dumps(truth))
    wrong, right_one, right_two = (100, 10, 140, 50), (10, 10, 50, 50), (20, 20, 60, 80)
    answers = {"one.png": {"a cat": [(wrong, 0.2), (right_one, 0.9)], "a dog": [((0, 0, 30, 30), 0.85)]},
               "two.png": {"a cat": [(right_two, 0.8)], "a dog": []}}
    return tmp_path, answers


def table(report: str, first: str) -> list[str]:
    return next(re.split(r"\s{2,}", line.strip()) for line in report.splitlines() if line.startswith(first))


def test_figures_of_a_run_equal_the_ones_worked_out_by_hand(two_cats):
    folder, answers = two_cats
    splits = read_detection_splits([folder / "cats.json"], folder)
    backend = StandIn(answers)
    outcome = run(splits, backend, PredictionLog(None, SETTINGS))
    assert backend.asked == [("one.png", ("a cat", "a dog")), ("two.png", ("a cat", "a dog"))]  # every category
    figures = summarise(splits[0].ground_truth, outcome.results[0].records)

    # With the scores, the wrong box (0.2) ranks after both right ones (0.9, 0.8): precision 1 at every recall.
    assert (figures.scored.ap, figures.scored.ap50, figures.scored.recall) == pytest.approx((1.0, 1.0, 1.0))
    # Every score 1.0: the boxes rank as written, the wrong one first: precision 1/2 then 2/3 at recall 1, so the
    # interpolated precision is 2/3 at every recall point; recall does not depend on the order.
    assert (figures.constant.ap, figures.constant.ap50, figures.constant.recall) == pytest.approx((2 / 3, 2 / 3, 1.0))
    # Present phrases score 0.9 and 0.8, absent ones 0.85 and 0 (no box): 3 of 4 pairs in order.
    assert figures.auroc == pytest.approx(0.75)
    assert (figures.images, figures.present, figures.absent, figures.objects) == (2, 2, 2, 2)
    rows = {row.min_score: (row.absent_kept, row.found, row.found_vs_none) for row in figures.table}
    assert rows[0.0] == (0.5, 1.0, 1.0)  # the dog's box in one.png is kept; both cats found
    assert rows[0.8] == (0.5, 1.0, 1.0)
    assert rows[0.9] == (0.0, 0.5, 0.5)  # only 0.9 is left: one cat of two

    report = format_report(outcome)
    assert "detection cats: 2 images scored, 0 skipped; 4 phrases asked (2 present, 2 absent), 2 objects" in report
    assert table(report, "boxes' scores") == ["boxes' scores", "100.00", "100.00", "100.00"]
    assert table(report, "every score 1.0") == ["every score 1.0", "66.67", "66.67", "100.00"]
    assert "Score AUROC, present against absent phrases: 0.750" in report
    assert table(report, "0.90 ") == ["0.90", "0.00", "50.00", "50.00"]


def test_a_federated_file_asks_each_image_its_own_and_its_absent_categories(two_cats):
    folder, answers = two_cats
    truth = json.loads((folder / "cats.json").read_text())
    truth["categories"].append({"id": 11, "name": "a bird"})
    truth["images"][0]["neg_category_ids"] = [9]  # one.png: the cat, and checked for a dog; two.png: the cat alone
    (folder / "federated.json").write_text(json.dumps(truth))
    backend = StandIn(answers)
    outcome = run(read_detection_splits([folder / "federated.json"], folder), backend, PredictionLog(None, SETTINGS))
    assert backend.asked == [("one.png", ("a cat", "a dog")), ("two.png", ("a cat",))]
    records = outcome.results[0].records
    assert [[(item["phrase"], item["present"]) for item in record["asked"]] for record in records] == [
        [("a cat", True), ("a dog", False)], [("a cat", True)]]


def test_an_ontology_asks_its_phrases_for_the_categories_it_names(two_cats):
    folder, answers = two_cats
    (folder / "ontology.json").write_text(json.dumps({"a cat": "a cat", "a kitten": "a cat"}))
    answers["one.png"]["a kitten"] = [((12, 10, 50, 50), 0.95)]
    answers["two.png"]["a kitten"] = []
    splits = read_detection_splits([folder / "cats.json"], folder, ontology=folder / "ontology.json")
    backend = StandIn(answers)
    outcome = run(splits, backend, PredictionLog(None, SETTINGS))
    assert backend.asked == [("one.png", ("a cat", "a kitten")), ("two.png", ("a cat", "a kitten"))]  # no dog
    assert [c["name"] for c in splits[0].ground_truth["categories"]] == ["a cat"]
    figures = summarise(splits[0].ground_truth, outcome.results[0].records)
    assert figures.present == 4 and figures.absent == 0 and figures.auroc is None
    assert figures.objects == 2  # a category's objects count once, whichever phrases found them
    assert [(row.min_score, row.found) for row in figures.table if row.min_score in (0.9, 0.8)] == [(0.8, 1.0),
                                                                                                    (0.9, 0.5)]


def test_a_rerun_with_the_same_out_asks_nothing_again(two_cats, tmp_path):
    folder, answers = two_cats
    out = tmp_path / "detections.jsonl"
    splits = read_detection_splits([folder / "cats.json"], folder)
    first = run(splits, StandIn(answers), PredictionLog(out, SETTINGS))
    again = StandIn(answers)
    second = run(splits, again, PredictionLog(out, SETTINGS))
    assert again.asked == [] and second.results[0].resumed == 2
    assert second.results[0].records == first.results[0].records
    assert [json.loads(line)["key"] for line in out.read_text().splitlines()] == ["1", "2"]
