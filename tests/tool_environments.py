"""Virtual environments for the tools whose pins clash with ours: Label Studio, the supervisely SDK, and torchvision.

Each lives outside the checkout, in a cache folder reused by every run and by .ci/run:
`$KOSMOS_TEST_ENVS`, else `$XDG_CACHE_HOME/kosmos-serve/test-envs`, else `~/.cache/kosmos-serve/test-envs`,
one folder per tool and version (`label-studio-1.23.2`, about 1.0 GB, 2.5 minutes to create;
`supervisely-6.74.51`, about 0.8 GB, 1.5 minutes; `torchvision-0.29.1`, about 5.7 GB, 2 minutes from this
machine's disk). torchvision, which transformers' SAM 2 and EdgeTAM processors need, imports only beside the torch
build it was made for, not ours (a CPU build): its environment holds PyPI's torch 2.14.1 (a CUDA build, which runs
on the CPU) and kosmos-serve from this checkout with its `sam2` extra, installed in one command so that pip keeps
that torch; it is made again when the checkout's dependencies change. The tests that drive a tool create its
environment the first time (under a lock, so parallel runs build it once); `python tests/tool_environments.py`
creates all three.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
TOOL_VERSIONS = {"label-studio": "1.23.2", "supervisely": "6.74.51", "torchvision": "0.29.1"}
# What else a tool's environment holds: packages at pinned versions (checked before each use, as the tool's own), and
# kosmos-serve from this checkout with one of its extras (what pyproject.toml asked for recorded in CHECKOUT_STAMP).
ALONGSIDE = {"torchvision": {"torch": "2.14.1"}}
CHECKOUT_EXTRA = {"torchvision": "sam2"}
CHECKOUT_STAMP = "kosmos-serve-dependencies.json"
VERSIONS_SCRIPT = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"


class ToolEnvironmentError(RuntimeError):
    """A tool's environment could not be created."""


def environments_root() -> Path:
    if os.environ.get("KOSMOS_TEST_ENVS"):
        return Path(os.environ["KOSMOS_TEST_ENVS"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kosmos-serve" / "test-envs"


def tool_python(tool: str) -> Path:
    """The Python of the environment holding `tool` at its pinned version, created (once, under a lock) when missing."""
    folder = environments_root() / f"{tool}-{TOOL_VERSIONS[tool]}"
    python = folder / "bin" / "python"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f"{tool}.lock").open("w") as held, contextlib.ExitStack() as unlock:
        fcntl.flock(held, fcntl.LOCK_EX)
        unlock.callback(fcntl.flock, held, fcntl.LOCK_UN)
        if not _current(folder, tool):
            began = time.monotonic()
            requirements = [f"{name}=={version}" for name, version in _pins(tool).items()]
            if tool in CHECKOUT_EXTRA:
                requirements.append(f"{CHECKOUT}[{CHECKOUT_EXTRA[tool]}]")
            try:
                subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True, timeout=300)
                subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements],
                               check=True, timeout=1800, capture_output=True, text=True)
            except subprocess.CalledProcessError as error:
                raise ToolEnvironmentError(f"could not install {' '.join(requirements)} into {folder}: "
                                           f"{error.stderr[-2000:]}") from error
            except (subprocess.SubprocessError, OSError) as error:
                raise ToolEnvironmentError(f"could not install {' '.join(requirements)} into {folder}: "
                                           f"{error}") from error
            if tool in CHECKOUT_EXTRA:
                (folder / CHECKOUT_STAMP).write_text(_checkout_dependencies())
            if not _current(folder, tool):
                raise ToolEnvironmentError(f"{folder} does not hold {' '.join(requirements)} after installing them")
            print(f"created {folder} in {time.monotonic() - began:.0f} s", file=sys.stderr)
    return python


def _pins(tool: str) -> dict[str, str]:
    return {tool: TOOL_VERSIONS[tool], **ALONGSIDE.get(tool, {})}


def _checkout_dependencies() -> str:
    """What this checkout's pyproject.toml asks for, extras included: an environment's record of what it holds."""
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]
    return json.dumps([project["dependencies"], project["optional-dependencies"]])


def _current(folder: Path, tool: str) -> bool:
    """Whether `folder` holds the tool's pins at their versions (and this checkout's dependencies, where it has them)."""
    python, pins = folder / "bin" / "python", _pins(tool)
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", VERSIONS_SCRIPT, *pins], check=False, capture_output=True, text=True,
                           timeout=60)
    if probe.returncode != 0 or json.loads(probe.stdout) != pins:
        return False
    stamp = folder / CHECKOUT_STAMP
    return tool not in CHECKOUT_EXTRA or (stamp.exists() and stamp.read_text() == _checkout_dependencies())


if __name__ == "__main__":
    for name in TOOL_VERSIONS:
        print(tool_python(name))
