"""`evaluate --benchmark ocr` end to end on the tiny random Kosmos-2.5: the report's figures recomputed here from the
written predictions, the lines equal to the engine's own reading, a resumed run, a service, and the wrong model or
ground truth refused in one line."""

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from local_server import serve_in_thread

from kosmos_serve.asgi import create_app
from kosmos_serve.cli import main
from kosmos_serve.config import ServerSettings
from kosmos_serve.engine import GenerationParams
from kosmos_serve.evaluation.backends import load_stored_pixels
from kosmos_serve.evaluation.ocr_metrics import PageCounts, score_page
from kosmos_serve.evaluation.ocr_pages import read_pages
from kosmos_serve.tasks import Task, TaskInput
from kosmos_serve.training.pages import write_pages_dataset

TOKENS = 24
README = Path(__file__).resolve().parents[2] / "README.md"


def invoke(*args):
    return CliRunner().invoke(main, ["evaluate", *(str(a) for a in args)], catch_exceptions=False)


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def ocr_figures(report: str) -> list[str]:
    """The cells of the report's ocr row: CER, WER, line P, R, F1, matched CER, pages, skipped."""
    row = next(line for line in report.splitlines() if line.startswith("ocr "))
    return re.split(r"\s{2,}", row.strip())[2:]


def percent(share):
    return "-" if share is None else f"{100 * share:.2f}"


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Five synthetic pages (seed 4) and their ground truth."""
    return write_pages_dataset(tmp_path_factory.mktemp("pages"), 5, seed=4)


@pytest.fixture(scope="module")
def local_run(pages, tiny_kosmos25_dir, tmp_path_factory):
    """The tiny Kosmos-2.5 scored here, its predictions written: (report, predictions file)."""
    out = tmp_path_factory.mktemp("ocr-run") / "predictions.jsonl"
    result = invoke("--model", tiny_kosmos25_dir, "--benchmark", "ocr", "--annotations", pages, "--images",
                    pages.parent, "--out", out, "--max-new-tokens", TOKENS)
    assert result.exit_code == 0, result.output
    return result.output, out


def test_the_report_is_what_the_written_predictions_score(local_run, tiny_kosmos25_dir, pages):
    report, out = local_run
    assert report.startswith(f"{tiny_kosmos25_dir} (this process): greedy, no_repeat_ngram_size 0, max_new_tokens "
                             f"{TOKENS}; task ocr;")
    records = read_lines(out)
    truth = read_lines(pages)
    assert [r["key"] for r in records] == [page["image"] for page in truth]
    total = PageCounts()
    for record, page in zip(records, truth):
        assert record["truth"] == [{"text": line["text"], "box": line["box"]} for line in page["lines"]]
        counts, matches = score_page([(line["text"], line["box"]) for line in record["lines"]],
                                     [(line["text"], line["box"]) for line in record["truth"]])
        assert record["counts"] == counts.as_dict()
        assert record["matches"] == [[p, t, round(overlap, 4)] for p, t, overlap in matches]
        total += counts
    figures = (total.cer, total.wer, total.precision, total.recall, total.f1, total.matched_cer)
    assert ocr_figures(report) == [*map(percent, figures), "5", "0"]


def test_the_predictions_are_the_engines_own_reading_of_each_page(local_run, kosmos25_engine, pages):
    _, out = local_run
    params = GenerationParams(max_new_tokens=TOKENS, no_repeat_ngram_size=0)
    for record in read_lines(out):
        result = kosmos25_engine.predict(load_stored_pixels(pages.parent / record["image"]), TaskInput(Task.OCR),
                                         params)
        assert record["raw_text"] == result.raw_text
        assert record["lines"] == [{"text": line.text, "box": list(line.box)} for line in result.lines]


def test_a_second_run_takes_every_page_from_the_first(local_run, tiny_kosmos25_dir, pages):
    report, out = local_run
    written = out.read_bytes()
    again = invoke("--model", tiny_kosmos25_dir, "--benchmark", "ocr", "--annotations", pages, "--images",
                   pages.parent, "--out", out, "--max-new-tokens", TOKENS)
    assert again.exit_code == 0 and out.read_bytes() == written
    assert ocr_figures(again.output) == ocr_figures(report)
    assert "ocr pages: 5 predictions taken from the earlier run in the --out file." in again.output


def test_a_limit_scores_a_sample_of_the_pages(tiny_kosmos25_dir, pages):
    result = invoke("--model", tiny_kosmos25_dir, "--benchmark", "ocr", "--annotations", pages, "--images",
                    pages.parent, "--limit", 2, "--max-new-tokens", 8)
    assert result.exit_code == 0 and ocr_figures(result.output)[-2:] == ["2", "0"]
    assert "ocr pages: a sample of 2 of 5 images (--limit)." in result.output


def test_through_a_service_the_predictions_are_the_same(local_run, kosmos25_engine, pages, tmp_path):
    app = create_app(ServerSettings(demo=False, max_batch_requests=8), kosmos25_engine.settings,
                     engine=kosmos25_engine)
    remote = tmp_path / "remote.jsonl"
    with serve_in_thread(app) as url:
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/ready").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.05)
        result = invoke("--url", url, "--benchmark", "ocr", "--annotations", pages, "--images", pages.parent,
                        "--out", remote, "--max-new-tokens", TOKENS)
    assert result.exit_code == 0, result.output
    _, local = local_run
    assert read_lines(remote) == read_lines(local)


def test_the_readmes_ground_truth_reads_a_line_of_corners_as_their_rectangle(tmp_path):
    example = next(line for line in README.read_text().splitlines() if line.startswith('{"image": "scans/0001.png"'))
    (tmp_path / "truth.jsonl").write_text(example + "\n")
    [page] = read_pages(tmp_path / "truth.jsonl", tmp_path)
    assert page.key == "scans/0001.png" and page.image_path == tmp_path / "scans/0001.png"
    assert page.truth == (("Total 50,000", (24, 872, 827, 921)), ("Thank you", (30, 936, 411, 984)))


@pytest.fixture(scope="module")
def wrong_truth(tmp_path_factory):
    """Ground-truth files each wrong in one way."""
    folder = tmp_path_factory.mktemp("bad-truth")
    files = {"no_lines": '{"image": "a.png"}\n',
             "bad_box": '{"image": "a.png", "lines": [{"text": "x", "box": [5, 0, 1, 2]}]}\n',
             "twice": '{"image": "a.png", "lines": []}\n{"image": "a.png", "lines": []}\n',
             "not_json": "a.png\n"}
    for name, text in files.items():
        (folder / f"{name}.jsonl").write_text(text)
    return folder


@pytest.mark.parametrize(("name", "message"), [
    ("no_lines", 'Error: {folder}/no_lines.jsonl line 1 has no "lines" list; expected OCR ground truth: JSON lines,'),
    ("bad_box", ('Error: {folder}/bad_box.jsonl line 1, lines[0]: "box" is not [x1, y1, x2, y2] with x1 <= x2 and '
                 "y1 <= y2; expected OCR ground truth")),
    ("twice", "Error: {folder}/twice.jsonl line 2: image 'a.png' is given twice."),
    ("not_json", "Error: {folder}/not_json.jsonl line 1 is not JSON; expected OCR ground truth"),
])
def test_bad_ground_truth_is_one_line_before_the_model_loads(wrong_truth, name, message):
    result = invoke("--model", "/nonexistent-model", "--benchmark", "ocr", "--annotations",
                    wrong_truth / f"{name}.jsonl", "--images", wrong_truth)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(message.format(folder=wrong_truth)), result.output


def test_a_kosmos2_given_to_the_ocr_benchmark_is_one_line(tiny_model_dir, pages):
    result = invoke("--model", tiny_model_dir, "--benchmark", "ocr", "--annotations", pages, "--images", pages.parent)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output == (f"Error: --benchmark ocr reads pages with a Kosmos-2.5 (task ocr), and "
                             f"'{tiny_model_dir}' is a Kosmos-2 model; give a Kosmos-2.5 (microsoft/kosmos-2.5, or a "
                             "folder).\n")


def test_a_kosmos25_given_to_the_grounding_modes_is_one_line(tiny_kosmos25_dir, shapes):
    result = invoke("--model", tiny_kosmos25_dir, "--benchmark", "refcoco", "--annotations", shapes.refcoco,
                    "--images", shapes.folder)
    assert result.output == (f"Error: --benchmark refcoco grounds phrases with a Kosmos-2 (task raw), and "
                             f"'{tiny_kosmos25_dir}' is a Kosmos-2.5 model; score a Kosmos-2.5 with --benchmark ocr.\n")
    result = invoke("--model", tiny_kosmos25_dir, "--data", shapes.records)
    assert result.exit_code == 1
    assert result.output == (f"Error: --data scores a Kosmos-2's grounding, and '{tiny_kosmos25_dir}' is a Kosmos-2.5 "
                             "model; score its reading with --benchmark ocr.\n")
