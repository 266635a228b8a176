"""annotate's output file: record lines, what an earlier run did, torn-line repair, one writer at a time."""

import json
from pathlib import Path

import pytest

from kosmos_serve.collections.inputs import ImageEntry
from kosmos_serve.collections.records import RecordAppender, annotated_record, read_previous
from kosmos_serve.engine import Result, Timings
from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.grounding import Entity
from kosmos_serve.tasks import Task


def iter_records(path: Path):
    """(line number, record) of each complete record line of an annotate output (a torn last line left out)."""
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if line.endswith(b"\n") and line.strip():
                yield number, json.loads(line)


def record(name, sha="ab" * 32, **extra):
    return {"path": name, "resolved": f"/data/{name}", "sha256": sha, "width": 4, "height": 3, "task": "caption",
            "prompt": "<grounding> An image of", "text": "An image of", "answer": "", "raw_text": "", "entities": [],
            "markdown": "An image of", "generated_tokens": 1, "model": "demo", "kosmos_serve_version": "0.1.0", **extra}


def failed(name):
    return {"path": name, "resolved": f"/data/{name}", "sha256": None, "width": None, "height": None,
            "task": "caption", "error": {"code": "invalid_image", "message": "The image file cannot be read."},
            "model": "demo", "kosmos_serve_version": "0.1.0"}


def lines(*records):
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def append(path: Path, *records):
    with RecordAppender(path, read_previous(path)) as appender:
        appender.append(list(records))


def test_no_file_means_nothing_done_and_nothing_written_until_the_first_append(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    previous = read_previous(out)
    assert previous.done == set() and not previous.torn
    with RecordAppender(out, previous):
        pass
    assert not out.parent.exists()
    append(out, record("a.png"), failed("b.png"))
    assert [r["path"] for _, r in iter_records(out)] == ["a.png", "b.png"]


def test_done_images_are_keyed_by_resolved_path_and_digest(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(lines(record("a.png"), failed("b.png")))
    previous = read_previous(out)
    assert previous.done == {("/data/a.png", "ab" * 32), ("/data/b.png", None)}
    assert previous.records == 2


def test_a_torn_last_line_is_dropped_before_appending(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = lines(record("a.png"), record("b.png"))
    out.write_bytes(whole + lines(record("c.png"))[:57])  # killed in the middle of writing c.png
    previous = read_previous(out)
    assert previous.torn and previous.done == {("/data/a.png", "ab" * 32), ("/data/b.png", "ab" * 32)}
    with RecordAppender(out, previous) as appender:
        appender.append([record("c.png")])
    assert out.read_bytes() == whole + lines(record("c.png"))


def test_a_whole_last_line_without_its_newline_is_kept_and_mended(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(lines(record("a.png"), record("b.png"))[:-1])
    previous = read_previous(out)
    assert previous.torn and ("/data/b.png", "ab" * 32) in previous.done
    with RecordAppender(out, previous) as appender:
        appender.append([record("c.png")])
    assert out.read_bytes() == lines(record("a.png"), record("b.png"), record("c.png"))


def test_blank_lines_are_allowed(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(lines(record("a.png")) + b"\n" + lines(record("b.png")))
    assert read_previous(out).records == 2


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"image": "a.png", "caption": "x"}\n', 'line 1: it has no "path"'),
        (lines(record("a.png")) + b"not json\n" + lines(record("b.png")), "line 2: not valid JSON"),
        (lines(record("a.png")) + b"[1, 2]\n", "line 2: it is not a JSON object"),
        (lines({**record("a.png"), "entities": None}), 'it has neither "error" nor "prompt" and "entities"'),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\n", "line 1: not valid JSON"),
    ],
)
def test_a_file_of_anything_else_is_refused_and_left_alone(tmp_path, content, problem):
    out = tmp_path / "out.jsonl"
    out.write_bytes(content)
    with pytest.raises(InvalidRequestError, match="is not the records of an earlier annotate run") as error:
        read_previous(out)
    assert problem in error.value.message and "choose another --out" in error.value.message
    assert out.read_bytes() == content


def test_a_folder_is_not_an_output_file(tmp_path):
    with pytest.raises(InvalidRequestError, match="is not a file"):
        read_previous(tmp_path)


def test_the_check_may_refuse_a_record(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(lines(record("a.png"), record("b.png")))
    seen = []

    def check(number, found):
        seen.append((number, found["path"]))
        if number == 2:
            raise InvalidRequestError("not this run's")

    with pytest.raises(InvalidRequestError, match="not this run's"):
        read_previous(out, check)
    assert seen == [(1, "a.png"), (2, "b.png")]


def test_a_second_writer_on_the_same_file_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    with RecordAppender(out, read_previous(out)) as first:
        first.append([record("a.png")])
        second = RecordAppender(out, read_previous(out))
        with pytest.raises(InvalidRequestError, match="Another annotate run is writing"):
            second.append([record("b.png")])
    assert [r["path"] for _, r in iter_records(out)] == ["a.png"]


def test_a_file_that_grew_since_it_was_read_is_not_appended_to(tmp_path):
    out = tmp_path / "out.jsonl"
    previous = read_previous(out)
    out.write_bytes(lines(record("a.png")))
    with pytest.raises(InvalidRequestError, match="changed while this run started"):
        RecordAppender(out, previous).append([record("b.png")])
    assert out.read_bytes() == lines(record("a.png"))


def test_records_are_utf8_json_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    append(out, record("été.png", text="Ein Bild von einem Hund ünd"))
    assert "été.png" in out.read_text(encoding="utf-8")
    assert [r["text"] for _, r in iter_records(out)] == ["Ein Bild von einem Hund ünd"]


def test_a_record_keeps_each_box_of_a_phrase_with_its_own_score(tmp_path):
    cars = Entity("a car", (0, 5), ((0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 0.8)), ((20, 20, 60, 40), (100, 50, 180, 80)),
                  (0.91, 0.37))
    result = Result(Task.DETECTION, "<grounding><phrase> a car</phrase>", "a car", "a car", "", (cars,), "",
                    (200, 100), 4, False, Timings())
    entry = ImageEntry("street.png", tmp_path / "street.png", "street.png")
    made = annotated_record(entry, "ab" * 32, result, model="demo", quantize="int8", min_score=0.35,
                            ontology={"a car": "car"})
    assert made["entities"] == [{"phrase": "a car", "class": "car", "span": [0, 5],
                                 "boxes": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.8]],
                                 "pixel_boxes": [[20, 20, 60, 40], [100, 50, 180, 80]], "scores": [0.91, 0.37]}]
    assert (made["model"], made["quantize"], made["min_score"]) == ("demo", "int8", 0.35)
    out = tmp_path / "out.jsonl"
    append(out, made)
    assert [r for _, r in iter_records(out)] == [made]


def test_the_file_remembers_the_threshold_of_its_first_record_at_each(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(lines(record("a.png", min_score=0.3), failed("b.png"), record("c.png", min_score=0.3),
                          record("d.png", min_score=0.5), record("old.png")))
    previous = read_previous(out)
    assert previous.min_scores == {0.3: (1, "a.png"), 0.5: (4, "d.png"), None: (5, "old.png")}
    with pytest.raises(InvalidRequestError, match=r"line 4 holds d\.png with boxes scored 0\.5 or more, not this "
                                                  r"run's min_score 0\.3"):
        previous.check_min_score(0.3, out)
    only_old = tmp_path / "old.jsonl"
    only_old.write_bytes(lines(record("old.png"), failed("b.png")))
    with pytest.raises(InvalidRequestError, match=r"line 1 holds old\.png with every box \(no min_score\), not "):
        read_previous(only_old).check_min_score(0.3, only_old)


def test_a_batch_at_another_threshold_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out.jsonl"
    append(out, record("a.png", min_score=0.3))
    before = out.read_bytes()
    with RecordAppender(out, read_previous(out)) as appender:
        with pytest.raises(InvalidRequestError, match="holds a.png with boxes scored 0.3 or more, not this run's "
                                                      "min_score 0.5"):
            appender.append([failed("b.png"), record("c.png", min_score=0.5)])
        assert out.read_bytes() == before
        appender.append([failed("b.png"), record("c.png", min_score=0.3)])  # the file's own threshold goes on
    assert [(r["path"], r.get("min_score")) for _, r in iter_records(out)] == [
        ("a.png", 0.3), ("b.png", None), ("c.png", 0.3)]


def test_the_file_remembers_the_overlap_of_its_first_record_at_each(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(lines(record("a.png", nms_iou=0.5), failed("b.png"), record("c.png"), record("d.png", nms_iou=0.5)))
    previous = read_previous(out)
    assert previous.nms_ious == {0.5: (1, "a.png"), None: (3, "c.png")}
    with pytest.raises(InvalidRequestError, match=r"line 3 holds c\.png with boxes kept however they overlap \(no "
                                                  r"nms_iou\), not this run's nms_iou 0\.5; give the same --nms-iou"):
        previous.check_nms_iou(0.5, out)
    with RecordAppender(out, previous) as appender, pytest.raises(InvalidRequestError, match="nms_iou 0.7"):
        appender.append([record("e.png", nms_iou=0.7)])
