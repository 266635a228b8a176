"""`annotate --ray` and `evaluate --ray` on a local Ray cluster, against the local runs, record for record."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kosmos_serve.cli import main
from kosmos_serve.evaluation.synthetic import write_mdetr_files
from kosmos_serve.training.demo_model import HELD_OUT_SEED
from kosmos_serve.training.shapes import write_shapes_dataset

EXAMPLES = Path(__file__).parents[2] / "examples"
SCENES = ["scene-four-shapes.png", "scene-three-shapes.png", "four-shapes.png", "shapes.png", "star-and-circles.png"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def records(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    by_path = {record["path"]: record for record in lines}
    assert len(by_path) == len(lines), "an image has two records"
    return by_path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of the five example scenes and one file that is not an image."""
    folder = tmp_path_factory.mktemp("ray-photos")
    for name in SCENES:
        shutil.copy(EXAMPLES / name, folder / name)
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def local_records(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    result = invoke("annotate", photos, "--out", out, "--model", "demo", "--phrase", "a blue circle")
    assert result.exit_code == 0, result.output
    return records(out)


def test_annotate_on_ray_writes_the_local_records(ray_cluster, photos, local_records, tmp_path):
    out = tmp_path / "ray.jsonl"
    result = invoke("annotate", photos, "--out", out, "--model", "demo", "--phrase", "a blue circle",
                    "--ray", "--workers", 2, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert "5 annotated, 0 skipped as already done, 1 failed" in result.output
    assert records(out) == local_records
    assert records(out)[str(photos / "broken.png")]["error"]["code"] == "invalid_image"


def test_resuming_on_ray_sends_only_images_not_done(ray_cluster, photos, local_records, tmp_path):
    out = tmp_path / "ray.jsonl"
    earlier = [local_records[str(photos / name)] for name in SCENES[:3]]
    out.write_text("".join(json.dumps(record) + "\n" for record in earlier), encoding="utf-8")
    result = invoke("annotate", photos, "--out", out, "--model", "demo", "--phrase", "a blue circle", "--ray")
    assert result.exit_code == 0, result.output
    assert "2 annotated, 3 skipped as already done, 1 failed" in result.output
    assert records(out) == local_records


def test_annotate_joins_a_running_cluster_by_its_address(ray_cluster, photos, local_records, tmp_path):
    """The README's way: a separate `kosmos-serve` process given --ray=HOST:PORT (the cluster's GCS address)."""
    import ray

    out = tmp_path / "joined.jsonl"
    environment = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "KOSMOS_THREADS": "1"}
    command = [sys.executable, "-c", "from kosmos_serve.cli import main; main()", "annotate", str(photos),
               "--out", str(out), "--model", "demo", "--phrase", "a blue circle", "--quiet",
               f"--ray={ray.get_runtime_context().gcs_address}", "--workers", "2"]
    finished = subprocess.run(command, check=False, capture_output=True, text=True, env=environment, timeout=240)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "5 annotated, 0 skipped as already done, 1 failed" in finished.stdout
    assert records(out) == local_records


def test_evaluate_on_ray_scores_as_locally(ray_cluster, tmp_path_factory, tmp_path):
    folder = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(folder, 4, HELD_OUT_SEED)
    refcoco = write_mdetr_files(folder)["refcoco"]
    runs = {}
    for name, extra in {"local": (), "ray": ("--ray", "--workers", 2)}.items():
        out = tmp_path / f"{name}.jsonl"
        result = invoke("evaluate", "--model", "demo", "--benchmark", "refcoco", "--annotations", refcoco,
                        "--images", folder, "--out", out, "--batch-size", 4, *extra)
        assert result.exit_code == 0, result.output
        runs[name] = sorted(out.read_text(encoding="utf-8").splitlines())
        report = [line for line in result.output.splitlines() if line.startswith("refcoco ")]
        runs[name + " report"] = report
    assert runs["ray"] == runs["local"] and len(runs["local"]) >= 4
    assert runs["ray report"] == runs["local report"]


def test_a_worker_without_the_model_stops_the_job_with_its_error(ray_cluster, photos, tmp_path):
    began = time.monotonic()
    result = invoke("annotate", photos, "--out", tmp_path / "out.jsonl", "--model", tmp_path / "no-model",
                    "--ray", "--workers", 2)
    assert result.exit_code == 1
    assert "A Ray worker cannot run the model, so the job stopped: the worker on " in result.output
    assert "is not a folder" in result.output and "Traceback" not in result.output
    assert time.monotonic() - began < 90
    assert not (tmp_path / "out.jsonl").exists()
