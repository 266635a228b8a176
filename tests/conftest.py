"""Shared fixtures: a tiny random Kosmos-2 (and Kosmos-2.5) built once per run and loaded like any checkpoint."""

from __future__ import annotations

import os

import pytest
from local_server import service_process
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# pytest-xdist runs the suite in one worker per core (pyproject's addopts): each worker, and the services it
# starts, takes its share of the cores for torch instead of all of them. Read by torch when it is first imported.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
REFERENCE_NEW_TOKENS = 24  # what the `reference` fixture generates unless told otherwise


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder of a tiny random Kosmos-2, written by the project's own builder."""
    from kosmos_serve.training.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-kosmos2"), seed=0)


@pytest.fixture(scope="session")
def tiny_kosmos25_dir(tmp_path_factory):
    """Folder of a tiny random Kosmos-2.5, written by the project's own builder."""
    from kosmos_serve.training.tiny_kosmos25 import build_tiny_kosmos25

    return build_tiny_kosmos25(tmp_path_factory.mktemp("tiny-kosmos25"), seed=0)


@pytest.fixture(scope="session")
def kosmos25_engine(tiny_kosmos25_dir):
    """An Engine on the tiny Kosmos-2.5, through the production loading code."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine

    return Engine(EngineSettings(model=str(tiny_kosmos25_dir), device="cpu", max_batch_rows=8))


@pytest.fixture(scope="session")
def tiny_segmenter_dir(tmp_path_factory):
    """Folder of a tiny random SAM (with SAM's own processor at a 64-pixel input), written by the project's builder."""
    from kosmos_serve.training.tiny_segmenter import build_tiny_segmenter

    return build_tiny_segmenter(tmp_path_factory.mktemp("tiny-sam"), "sam", seed=0)


@pytest.fixture(scope="session")
def segmenting_engine(tiny_model_dir, tiny_segmenter_dir):
    """An Engine on the tiny Kosmos-2 with the tiny SAM as its segmenter (`--segmenter`), both loaded as in production."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine

    return Engine(EngineSettings(model=str(tiny_model_dir), segmenter=str(tiny_segmenter_dir), device="cpu",
                                 max_batch_rows=8))


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    """An Engine on the tiny model, through the production loading code."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine

    return Engine(EngineSettings(model=str(tiny_model_dir), device="cpu", max_batch_rows=8))


@pytest.fixture(scope="session")
def sample_images():
    """Three different RGB images of different sizes and aspect ratios."""
    mandelbrot = Image.effect_mandelbrot((640, 480), (-2.0, -1.5, 1.0, 1.5), 60).convert("RGB")
    gradient = Image.linear_gradient("L").resize((300, 200)).convert("RGB")
    noise = Image.effect_noise((200, 320), 60).convert("RGB")
    return [mandelbrot, gradient, noise]


@pytest.fixture(scope="session")
def kosmos25_pages(sample_images):
    """Images of four sizes, so of four Kosmos-2.5 patch counts (4015, 4056, 4000 and 3600 of the 4096), one of them
    a page."""
    page = Image.new("RGB", (500, 160), "white")
    draw = ImageDraw.Draw(page)
    for row, line in enumerate(["RECEIPT 0008", "1 BLACK SAKURA    45,455", "Total             50,000"]):
        draw.text((20, 20 + 45 * row), line, fill="black")
    return [*sample_images, page]


@pytest.fixture
def image_file(tmp_path, sample_images):
    """The first sample image saved as a PNG file."""
    path = tmp_path / "scene.png"
    sample_images[0].save(path)
    return path


@pytest.fixture(scope="session")
def reference(tiny_model_dir):
    """Stock transformers: model-card code, one request at a time."""
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    model = Kosmos2ForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)

    def run(image, spec, max_new_tokens=REFERENCE_NEW_TOKENS, **generate_kwargs):
        inputs = processor(text=spec.text, images=image, bboxes=list(spec.bboxes) if spec.bboxes else None,
                           return_tensors="pt")
        ids = model.generate(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            image_embeds=None,
            image_embeds_position_mask=inputs["image_embeds_position_mask"],
            use_cache=True,
            max_new_tokens=max_new_tokens,
            no_repeat_ngram_size=3,
            **generate_kwargs,
        )
        decoded = processor.batch_decode(ids, skip_special_tokens=True)[0]
        raw = processor.post_process_generation(decoded, cleanup_and_extract=False)
        text, entities = processor.post_process_generation(decoded)
        return raw, text, entities

    run.model, run.processor = model, processor
    return run


@pytest.fixture
def command_service():
    """`kosmos-serve ARGS` as a real process on a free port, ready: `with command_service(args, env) as service`
    (local_server.service_process)."""
    return service_process


def _tool_python(tool: str) -> str:
    """The tool's own environment (tests/tool_environments.py); skipped where it cannot be made, failed in CI."""
    from tool_environments import ToolEnvironmentError, tool_python

    try:
        return str(tool_python(tool))
    except ToolEnvironmentError as error:
        if os.environ.get("CI"):
            pytest.fail(str(error))
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def supervisely_python() -> str:
    """The Python of an environment holding the `supervisely` SDK, which pins older fastapi and pydantic than ours."""
    return _tool_python("supervisely")


@pytest.fixture(scope="session")
def label_studio_python() -> str:
    """The Python of an environment holding Label Studio, which pins its own Django stack."""
    return _tool_python("label-studio")


@pytest.fixture(scope="session")
def torchvision_python() -> str:
    """The Python of an environment holding torchvision (for SAM 2's processor) beside the torch it was built for,
    and kosmos-serve with its `sam2` extra: ours is a CPU torch, beside which PyPI's torchvision does not import."""
    return _tool_python("torchvision")
