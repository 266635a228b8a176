"""Synthetic shapes scenes written as the benchmarks' files, and the demo model that grounds them."""

from types import SimpleNamespace

import pytest

from kosmos_serve.evaluation.synthetic import write_detection_file, write_mdetr_files
from kosmos_serve.training.demo_model import HELD_OUT_SEED
from kosmos_serve.training.shapes import write_shapes_dataset

SCENES = 10  # about 25 expressions and 25 phrases: a few seconds of the demo model


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """Held-out scenes (`folder/images`, `folder/records.jsonl`) and their MDETR-format files (`refcoco`, `flickr30k`,
    `flickr_entities`)."""
    folder = tmp_path_factory.mktemp("shapes-benchmarks")
    records = write_shapes_dataset(folder, SCENES, HELD_OUT_SEED)
    return SimpleNamespace(folder=folder, records=records, **write_mdetr_files(folder))


@pytest.fixture(scope="session")
def detection_file(shapes):
    """The held-out scenes' COCO ground truth for `--benchmark detection`, 4 absent phrases per scene."""
    return write_detection_file(shapes.folder, absent=4, seed=HELD_OUT_SEED)


@pytest.fixture(scope="session")
def demo_engine():
    """The shipped demo model, loaded once."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine
    from kosmos_serve.engine.loading import quiet_transformers

    quiet_transformers()
    return Engine(EngineSettings(model="demo", max_batch_rows=16))
