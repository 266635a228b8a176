"""Decoding parameters: one set of ranges, and defaults in layers (request, operator, model file, built-in)."""

import pytest

from kosmos_serve.errors import InvalidRequestError, ModelLoadError
from kosmos_serve.generation import (
    BUILT_IN_DEFAULTS,
    MODEL_DEFAULTS_FILE,
    GenerationParams,
    ModelDefaults,
    read_model_defaults,
    resolve_defaults,
)


def test_a_folder_without_a_defaults_file_sets_none(tmp_path):
    assert read_model_defaults(tmp_path) == ModelDefaults()
    assert resolve_defaults(ModelDefaults(), read_model_defaults(tmp_path)) == BUILT_IN_DEFAULTS


def test_a_defaults_file_is_read_and_the_operator_overrides_it(tmp_path):
    (tmp_path / MODEL_DEFAULTS_FILE).write_text('{"default_prompt": "<grounding> An image of", "max_new_tokens": 40}')
    from_model = read_model_defaults(tmp_path)
    assert from_model == ModelDefaults(default_prompt="<grounding> An image of", max_new_tokens=40)
    resolved = resolve_defaults(ModelDefaults(max_new_tokens=8), from_model)
    assert resolved == ModelDefaults(default_prompt="<grounding> An image of", max_new_tokens=8,
                                     no_repeat_ngram_size=BUILT_IN_DEFAULTS.no_repeat_ngram_size,
                                     min_score=BUILT_IN_DEFAULTS.min_score, nms_iou=BUILT_IN_DEFAULTS.nms_iou)


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not a valid kosmos-serve defaults file"),
    ('{"max_new_tokens": 0}', "max_new_tokens: Input should be greater than or equal to 1"),
    ('{"no_repeat_ngram_size": -1}', "no_repeat_ngram_size"),
    ('{"min_score": 1.5}', "min_score: Input should be less than or equal to 1"),
    ('{"nms_iou": -0.5}', "nms_iou: Input should be greater than or equal to 0"),
    ('{"temperature": 0.5}', "temperature: Extra inputs are not permitted"),
])
def test_a_bad_defaults_file_is_a_load_error_naming_it(tmp_path, content, problem):
    (tmp_path / MODEL_DEFAULTS_FILE).write_text(content)
    with pytest.raises(ModelLoadError, match=problem) as raised:
        read_model_defaults(tmp_path)
    assert str(tmp_path / MODEL_DEFAULTS_FILE) in raised.value.message


@pytest.mark.parametrize("params, problem", [
    (GenerationParams(temperature=float("nan")), "temperature: Input should be a finite number"),
    (GenerationParams(temperature=0.001), "temperature: Input should be greater than or equal to 0.01"),
    (GenerationParams(top_p=0.0), "top_p: Input should be greater than 0"),
    (GenerationParams(num_beams=9), "num_beams: Input should be less than or equal to 8"),
    (GenerationParams(seed=-1), "seed: Input should be greater than or equal to 0"),
    (GenerationParams(max_new_tokens=33), "max_new_tokens: Must be between 1 and 32"),
])
def test_parameters_out_of_range_are_named(params, problem):
    with pytest.raises(InvalidRequestError, match=problem):
        params.validate(max_new_tokens_cap=32)


def test_parameters_in_range_pass():
    GenerationParams(max_new_tokens=32, do_sample=True, temperature=0.01, top_p=1.0, num_beams=8,
                     no_repeat_ngram_size=0, seed=2**53 - 1).validate(max_new_tokens_cap=32)
