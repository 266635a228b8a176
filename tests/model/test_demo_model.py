"""The shipped demo model: its size, defaults and captions. Its held-out scores (scenes of a seed never used in
training) are the README's, checked by tests/test_readme.py running the README's own `evaluate` command."""

import json

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine
from kosmos_serve.engine.loading import DEMO_MODEL_DIR


def test_demo_model_is_small_enough_to_ship():
    assert sum(path.stat().st_size for path in DEMO_MODEL_DIR.iterdir()) <= 25 * 2**20


def test_the_demo_model_carries_its_own_defaults_and_settings_override_them():
    from kosmos_serve.generation import ModelDefaults
    from kosmos_serve.training.demo_model import DEMO_DEFAULTS

    assert Engine(EngineSettings(model="demo")).defaults == DEMO_DEFAULTS
    operator = Engine(EngineSettings(model="demo", max_new_tokens=8, no_repeat_ngram_size=3, min_score=0.5,
                                     nms_iou=0.9)).defaults
    assert operator == ModelDefaults(default_prompt=DEMO_DEFAULTS.default_prompt, max_new_tokens=8,
                                     no_repeat_ngram_size=3, min_score=0.5, nms_iou=0.9)


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
