"""`annotate --ray --task ocr` with a Kosmos-2.5 on a local Ray cluster: records with the lines read, the local run's,
record for record.

A random model writes no lines, so every engine (the local run's, and each Ray worker's, through Ray's worker setup
hook) is made to write READING: only its choice of tokens is replaced.
"""

import os

import pytest
from PIL import Image, ImageDraw
from test_ray_data import invoke, records
from transformers import AutoProcessor

from kosmos_serve.engine import scheduler as scheduler_module
from kosmos_serve.engine.families import Kosmos25Family
from kosmos_serve.tasks import PromptSpec

READING = "<bbox><x_12><y_20><x_240><y_44></bbox>RECEIPT 0008\n<bbox><x_12><y_60><x_300><y_80></bbox>Total 50,000\n"


@pytest.fixture(scope="module")
def reading_choice(tiny_kosmos25_dir):
    """A `choose_tokens` that writes READING, then `</s>`, after the `<ocr>` prompt."""
    processor = AutoProcessor.from_pretrained(tiny_kosmos25_dir)
    tokenizer = processor.tokenizer
    reading = tokenizer(READING, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_length = len(Kosmos25Family().tokenise(processor, PromptSpec("<ocr>"))[0])

    def choose(logits, choosers, ids):
        return [reading[len(row) - prompt_length] for row in ids]

    return choose


@pytest.fixture(scope="module")
def ray_cluster_reading(reading_choice):
    """As conftest's `ray_cluster`, with every worker's engine writing READING (set as each worker starts)."""
    import ray

    def write_the_reading():  # Ray pickles it by value and runs it in each worker as it starts
        scheduler_module.choose_tokens = reading_choice

    os.environ["KOSMOS_THREADS"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="WARNING", runtime_env={"worker_process_setup_hook": write_the_reading})
    yield
    ray.shutdown()
    os.environ.pop("KOSMOS_THREADS", None)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-pages")
    for number, text in enumerate(["RECEIPT 0008", "Total 50,000", "SUB TOTAL"]):
        image = Image.new("RGB", (500, 160 + 40 * number), "white")
        ImageDraw.Draw(image).text((20, 20), text, fill="black")
        image.save(folder / f"page-{number}.png")
    return folder


def test_annotate_ocr_on_ray_writes_the_local_records_with_their_lines(ray_cluster_reading, reading_choice,
                                                                       tiny_kosmos25_dir, pages, monkeypatch,
                                                                       tmp_path):
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    task = ["--model", tiny_kosmos25_dir, "--task", "ocr"]
    with monkeypatch.context() as patch:
        patch.setattr(scheduler_module, "choose_tokens", reading_choice)
        result = invoke("annotate", pages, "--out", local, *task)
    assert result.exit_code == 0, result.output
    result = invoke("annotate", pages, "--out", on_ray, *task, "--ray", "--workers", 2, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert "3 annotated, 0 skipped as already done, 0 failed" in result.output
    assert records(on_ray) == records(local)
    for record in records(on_ray).values():
        assert [line["text"] for line in record["lines"]] == ["RECEIPT 0008", "Total 50,000"]
        assert all(0 < line["score"] < 1 for line in record["lines"])
