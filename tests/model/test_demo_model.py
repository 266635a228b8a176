"""The shipped demo model really grounds: scored on scenes of a seed never used in training."""

import json

import pytest

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine
from kosmos_serve.engine.loading import DEMO_MODEL_DIR
from kosmos_serve.training.demo_model import HELD_OUT_SEED, TRAIN_SEED
from kosmos_serve.training.evaluate import evaluate
from kosmos_serve.training.records import read_examples
from kosmos_serve.training.shapes import write_shapes_dataset

SCENES = 40
# On these 40 scenes the demo model scores 92% (referring) and 80% (caption objects); the README's figures
# are on 200. The bars leave room for other CPUs' rounding; a model that does not ground scores ~0.
BARS = {"referring": 0.85, "caption": 0.75}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    assert HELD_OUT_SEED != TRAIN_SEED
    records = write_shapes_dataset(tmp_path_factory.mktemp("held-out"), SCENES, HELD_OUT_SEED)
    return [example for example in read_examples(records) if example.kind in BARS]


def test_demo_model_is_small_enough_to_ship():
    assert sum(path.stat().st_size for path in DEMO_MODEL_DIR.iterdir()) <= 25 * 2**20


def test_demo_model_grounds_held_out_scenes(held_out):
    scores = evaluate(Engine(EngineSettings(model="demo")), held_out)
    for kind, bar in BARS.items():
        assert scores[kind].rate >= bar, f"{kind}: {scores[kind].rate:.1%} ({scores[kind].hits}/{scores[kind].total})"


def test_the_demo_model_carries_its_own_defaults_and_settings_override_them():
    from kosmos_serve.generation import ModelDefaults
    from kosmos_serve.training.demo_model import DEMO_DEFAULTS

    assert Engine(EngineSettings(model="demo")).defaults == DEMO_DEFAULTS
    operator = Engine(EngineSettings(model="demo", max_new_tokens=8, no_repeat_ngram_size=3, min_score=0.5)).defaults
    assert operator == ModelDefaults(default_prompt=DEMO_DEFAULTS.default_prompt, max_new_tokens=8,
                                     no_repeat_ngram_size=3, min_score=0.5)


def test_predict_with_no_options_gives_the_demo_models_grounded_caption(tmp_path):
    """The caption of every object, which the original demo's 3-gram rule would cut short (README)."""
    from click.testing import CliRunner

    from kosmos_serve.cli import main
    from kosmos_serve.demo import EXAMPLES_DIR
    from kosmos_serve.engine import GenerationParams
    from kosmos_serve.images import load_image
    from kosmos_serve.tasks import Task, TaskInput

    scene = EXAMPLES_DIR / "scene-four-shapes.png"
    result = CliRunner().invoke(main, ["predict", str(scene), "--model", "demo", "--json"], catch_exceptions=False)
    answer = json.loads(result.output)[0]
    plain_greedy = Engine(EngineSettings(model="demo")).predict(
        load_image(scene), TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=64, no_repeat_ngram_size=0)
    )
    assert answer["text"] == plain_greedy.text and answer["text"].startswith("An image of a ")
    assert len(answer["entities"]) >= 3
