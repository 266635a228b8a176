"""`kosmos-serve annotate` as a real process: SIGKILL at random moments, then Ctrl-C (SIGINT)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kosmos_serve.cli import main

IMAGES = 40  # 39 good and one that is not an image: its error line must be there exactly once too


@pytest.fixture
def folder(tmp_path):
    """Small distinct images, and one undecodable file among them."""
    images = tmp_path / "images"
    images.mkdir()
    for number in range(IMAGES - 1):
        Image.effect_noise((48 + number, 40), 20 + number).convert("RGB").save(images / f"{number:02d}.png")
    (images / "broken.png").write_bytes(b"not an image at all")
    return images


def command(folder, out, model, batch_size):
    return [sys.executable, "-m", "kosmos_serve.cli", "annotate", str(folder), "--out", str(out), "--model", str(model),
            "--phrase", "a red car", "--phrase", "a dog", "--max-new-tokens", "8", "--batch-size", str(batch_size),
            "--quiet"]


ENVIRONMENT = {**os.environ, "KOSMOS_THREADS": "1"}  # the tiny model gains nothing from more on a shared machine


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("KOSMOS_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def start(args):
    return subprocess.Popen(args, env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def line_count(out):
    return out.read_bytes().count(b"\n") if out.exists() else 0


def wait_for_more_lines(out, process, than, timeout=60):
    """Wait until `out` has more than `than` lines (or the process ended)."""
    deadline = time.monotonic() + timeout
    while line_count(out) <= than and process.poll() is None:
        assert time.monotonic() < deadline, "annotate wrote nothing"
        time.sleep(0.01)


def complete(args):
    """Run the same command to the end, in this process (a process start costs seconds of imports)."""
    return CliRunner().invoke(main, args[3:], catch_exceptions=False)


def records(out):
    data = out.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode().splitlines()]


def test_sigkill_at_random_moments_leaves_every_image_exactly_once(folder, tmp_path, tiny_model_dir):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    out = tmp_path / "out.jsonl"
    args = command(folder, out, tiny_model_dir, batch_size=2)
    torn = 0
    for attempt in range(3):
        process = start(args)
        if attempt == 0:
            time.sleep(rng.uniform(0.0, 3.0))  # anywhere from startup and model loading to the first batches
        else:
            wait_for_more_lines(out, process, than=line_count(out))
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere while it writes
        process.kill()
        process.communicate()
        torn += out.exists() and not out.read_bytes().endswith(b"\n")
    done = complete(args)
    assert done.exit_code == 0, (seed, done.output)
    found = records(out)
    counts = Counter(record["resolved"] for record in found)
    assert set(counts) == {str(path) for path in folder.iterdir()}, seed
    assert set(counts.values()) == {1}, (seed, torn)
    assert sum("error" in record for record in found) == 1


def test_ctrl_c_finishes_the_batch_and_says_how_to_resume(folder, tmp_path, tiny_model_dir):
    out = tmp_path / "out.jsonl"
    args = command(folder, out, tiny_model_dir, batch_size=4)
    process = start(args)
    wait_for_more_lines(out, process, than=0)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Stopping after the current batch" in stderr
    assert "Interrupted: every finished batch is in" in stdout and "Run the same command again to continue" in stdout
    written = len(records(out))
    assert written % 4 == 0 and 0 < written < IMAGES  # whole batches only
    done = complete(args)
    assert done.exit_code == 0, done.output
    assert f"{written} skipped as already done" in done.stdout
    assert Counter(record["resolved"] for record in records(out)) == Counter(str(p) for p in folder.iterdir())
