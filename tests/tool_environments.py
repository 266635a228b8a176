"""Virtual environments for the tools whose pins clash with ours: Label Studio and the supervisely SDK.

Each lives outside the checkout, in a cache folder reused by every run and by .ci/run:
`$KOSMOS_TEST_ENVS`, else `$XDG_CACHE_HOME/kosmos-serve/test-envs`, else `~/.cache/kosmos-serve/test-envs`,
one folder per tool and version (`label-studio-1.23.2`, about 1.0 GB, 2.5 minutes to create;
`supervisely-6.74.51`, about 0.8 GB, 1.5 minutes). The tests that drive a tool create its environment the
first time (under a lock, so parallel runs build it once); `python tests/tool_environments.py` creates both.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

TOOL_VERSIONS = {"label-studio": "1.23.2", "supervisely": "6.74.51"}


class ToolEnvironmentError(RuntimeError):
    """A tool's environment could not be created."""


def environments_root() -> Path:
    if os.environ.get("KOSMOS_TEST_ENVS"):
        return Path(os.environ["KOSMOS_TEST_ENVS"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kosmos-serve" / "test-envs"


def tool_python(tool: str) -> Path:
    """The Python of the environment holding `tool` at its pinned version, created (once, under a lock) when missing."""
    version = TOOL_VERSIONS[tool]
    folder = environments_root() / f"{tool}-{version}"
    python = folder / "bin" / "python"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f"{tool}.lock").open("w") as held, contextlib.ExitStack() as unlock:
        fcntl.flock(held, fcntl.LOCK_EX)
        unlock.callback(fcntl.flock, held, fcntl.LOCK_UN)
        if _installed_version(python, tool) != version:
            began = time.monotonic()
            try:
                subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True, timeout=300)
                subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{tool}=={version}"],
                               check=True, timeout=1800, capture_output=True, text=True)
            except subprocess.CalledProcessError as error:
                raise ToolEnvironmentError(f"could not install {tool}=={version} into {folder}: "
                                           f"{error.stderr[-2000:]}") from error
            except (subprocess.SubprocessError, OSError) as error:
                raise ToolEnvironmentError(f"could not install {tool}=={version} into {folder}: {error}") from error
            print(f"created {folder} in {time.monotonic() - began:.0f} s", file=sys.stderr)
    return python


def _installed_version(python: Path, tool: str) -> str | None:
    if not python.exists():
        return None
    probe = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({tool!r}))"],
                           check=False, capture_output=True, text=True, timeout=60)
    return probe.stdout.strip() if probe.returncode == 0 else None


if __name__ == "__main__":
    for name in TOOL_VERSIONS:
        print(tool_python(name))
