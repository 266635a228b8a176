"""`--ray` refused with a clear message and exit code 1: Ray missing, an address nobody answers, a mistaken one."""

import socket
import sys
import time

import pytest
from click.testing import CliRunner

from kosmos_serve.cli import main

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="the ray extra is not installed (pip install -e '.[ray]')")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_without_ray_the_message_names_the_install_command(monkeypatch, tmp_path):
    for name in [name for name in sys.modules if name == "ray" or name.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    for command in (["annotate", "examples", "--out", tmp_path / "r.jsonl", "--model", "demo", "--ray"],
                    ["serve", "--model", "demo", "--ray", "--replicas", 2]):
        result = invoke(*command)
        assert result.exit_code == 1
        assert "pip install 'kosmos-serve[ray]'" in result.output and "Traceback" not in result.output


@needs_ray
def test_an_unreachable_address_fails_within_seconds(tmp_path):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    began = time.monotonic()
    result = invoke("annotate", "examples", "--out", tmp_path / "r.jsonl", "--model", "demo", f"--ray=127.0.0.1:{port}")
    assert result.exit_code == 1
    assert f"No Ray cluster answers at 127.0.0.1:{port}" in result.output
    assert time.monotonic() - began < 10
    assert not (tmp_path / "r.jsonl").exists()


@needs_ray
def test_an_input_taken_for_the_address_is_explained(tmp_path):
    result = invoke("annotate", "--out", tmp_path / "r.jsonl", "--model", "demo", "--ray", "examples", "examples")
    assert result.exit_code == 1
    assert "--ray took 'examples' as the cluster's address" in result.output


def test_ray_options_without_ray_are_refused(tmp_path):
    result = invoke("annotate", "examples", "--out", tmp_path / "r.jsonl", "--model", "demo", "--workers", 2)
    assert result.exit_code == 1 and "go with --ray" in result.output
    result = invoke("evaluate", "--model", "demo", "--benchmark", "refcoco", "--annotations", tmp_path / "a.json",
                    "--images", tmp_path, "--out", tmp_path / "p.jsonl", "--gpus-per-worker", 1)
    assert result.exit_code == 1 and "go with --ray" in result.output
    (tmp_path / "records.jsonl").write_text("", encoding="utf-8")
    result = invoke("evaluate", "--model", "demo", "--data", tmp_path / "records.jsonl", "--workers", 2)
    assert result.exit_code == 1 and "--workers: only with --benchmark NAME" in result.output
    result = invoke("serve", "--model", "demo", "--replicas", 2)
    assert result.exit_code == 1 and "go with --ray" in result.output


@needs_ray
def test_a_wrong_autoscale_range_is_refused():
    result = invoke("serve", "--model", "demo", "--ray", "--autoscale", "3,1")
    assert result.exit_code == 1 and "--autoscale '3,1': write MIN,MAX" in result.output
