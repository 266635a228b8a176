"""Shared fixtures: a tiny random Kosmos-2 built once per run and loaded like any checkpoint."""

from __future__ import annotations

import os

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder of a tiny random Kosmos-2, written by the project's own builder."""
    from kosmos_serve.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-kosmos2"), seed=0)


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    """An Engine on the tiny model, through the production loading code."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine

    return Engine(EngineSettings(model=str(tiny_model_dir), device="cpu", max_batch_size=8))


@pytest.fixture(scope="session")
def sample_images():
    """Three different RGB images of different sizes and aspect ratios."""
    mandelbrot = Image.effect_mandelbrot((640, 480), (-2.0, -1.5, 1.0, 1.5), 60).convert("RGB")
    gradient = Image.linear_gradient("L").resize((300, 200)).convert("RGB")
    noise = Image.effect_noise((200, 320), 60).convert("RGB")
    return [mandelbrot, gradient, noise]
