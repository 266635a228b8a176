"""The command line's start-up: --help (the group's and each command's) and refused input import no heavy library."""

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from kosmos_serve.cli import main

HEAVY = {"torch", "transformers", "fastapi", "uvicorn", "gradio", "ray", "pycocotools"}
COMMANDS = main.list_commands(click.Context(main))


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -m kosmos_serve.cli ARGS` run, and the top-level packages it imported (from `python -X importtime`)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "kosmos_serve.cli", *args], check=False,
                         capture_output=True, text=True)
    lines = [line for line in run.stderr.splitlines() if line.startswith("import time:")][1:]  # [0]: the header
    return run, {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines}


@pytest.mark.parametrize("args", [[], *([name] for name in COMMANDS), ["data", "shapes"], ["data", "pages"]],
                         ids=lambda args: " ".join(args) or "kosmos-serve")
def test_help_imports_no_heavy_library(args):
    run, packages = run_cli(*args, "--help")
    assert run.returncode == 0 and "Usage: python -m kosmos_serve.cli" in run.stdout
    assert "click" in packages  # the listing is read
    assert packages & HEAVY == set()


def test_predict_refuses_a_bad_image_before_importing_torch(tmp_path):
    image = tmp_path / "empty.png"
    image.write_bytes(b"")
    run, packages = run_cli("predict", str(image), "--model", "demo")
    assert run.returncode == 1 and f"Error: {image}: " in run.stderr
    assert packages & HEAVY == set()


def test_help_lists_each_command_as_its_own_docstring_would():
    context = click.Context(main)
    loaded = {name: main.get_command(context, name) for name in COMMANDS}
    eager = click.Group(main.name, commands=loaded, params=main.params, help=main.help)
    assert sorted(loaded) == sorted(["annotate", "data", "demo", "evaluate", "export", "predict", "serve", "tiny-model",
                                     "tiny-segmenter", "train", "train-demo", "train-demo-2.5", "train-demo-segmenter"])
    assert CliRunner().invoke(main, ["--help"]).output == CliRunner().invoke(eager, ["--help"]).output


def test_an_unknown_command_is_refused_by_name():
    result = CliRunner().invoke(main, ["predikt"])
    assert result.exit_code == 2
    assert "No such command 'predikt'" in result.output
