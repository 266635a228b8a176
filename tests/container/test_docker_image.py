"""docker/Dockerfile (CPU) built with podman and run: docker/build-and-check.sh, a few minutes.

The script makes a Debian base from this machine's mirror, builds the image with pip's configuration of this
machine, runs it on a loopback port and checks it: /ready, POST /predict answering as a local
`kosmos-serve serve --model demo`, a non-root user, the HEALTHCHECK, a stop on SIGTERM within 10 s. It needs root,
podman, runc and mmdebstrap (.ci/run installs them): without them the test skips; in CI (`CI` set) it fails.
`python -m pytest -m container -s` runs it alone and shows its measures (build time, size, stop time).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.container
SCRIPT = Path(__file__).parents[2] / "docker" / "build-and-check.sh"


def test_cpu_image_builds_and_serves_the_demo_model():
    missing = [tool for tool in ("podman", "runc", "mmdebstrap", "curl") if shutil.which(tool) is None]
    reason = (f"{', '.join(missing)} not installed (.ci/run installs them)" if missing
              else "podman here is set up for root" if os.geteuid() != 0 else None)
    if reason:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    run = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "PYTHON": sys.executable}, check=False,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-6000:]
    assert "== OK:" in run.stdout
