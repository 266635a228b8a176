"""int4 text weights: the layer is its dequantized weights' product, rows never depend on their batch, and
`--quantize int4` loads through the production code (and refuses what it cannot run)."""

import pytest
import torch
from pydantic import ValidationError

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, Request, loading
from kosmos_serve.engine.kernels import (
    Int4WeightOnlyLinear,
    RowwiseInt8Linear,
    dequantize_int4_groups,
    quantize_int4_groups,
)
from kosmos_serve.errors import ModelLoadError
from kosmos_serve.tasks import Task, TaskInput


@pytest.fixture(scope="module")
def int4_engine(tiny_model_dir):
    return Engine(EngineSettings(model=str(tiny_model_dir), device="cpu", quantize="int4", int4_group_size=32))


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("out_features", [96, 100])  # 100: not a multiple of the kernel's 16-row blocks
def test_int4_layer_is_its_dequantized_weights_product(group_size, out_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, out_features)
    layer = Int4WeightOnlyLinear(linear.weight, linear.bias, group_size)
    levels, scales_and_offsets = quantize_int4_groups(linear.weight.detach(), group_size)
    assert levels.min() >= 0 and levels.max() <= 15 and scales_and_offsets.shape == (256 // group_size, out_features, 2)
    dequantized = dequantize_int4_groups(levels, scales_and_offsets.to(torch.bfloat16))  # the scales the layer holds
    rows = torch.randn(5, 256) * 3
    with torch.no_grad():
        expected = torch.nn.functional.linear(rows.to(torch.bfloat16).float(), dequantized, linear.bias)
        got = layer(rows)
        exact = linear(rows)
    assert got.shape == (5, out_features) and got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    assert (got - exact).norm() / exact.norm() < 0.1  # 4 bits: close to float32, not equal
    assert (dequantized - linear.weight).abs().max() <= (linear.weight.max() - linear.weight.min()) / 15


def test_int4_quantizer_maps_each_groups_extremes_to_the_ends():
    weight = torch.tensor([[-1.0, 0.0, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0]])
    levels, scales_and_offsets = quantize_int4_groups(weight, group_size=4)
    assert levels[0].tolist() == [0, 4, 6, 15]
    assert torch.allclose(dequantize_int4_groups(levels, scales_and_offsets)[0, [0, 3]], torch.tensor([-1.0, 3.0]))
    assert torch.allclose(dequantize_int4_groups(levels, scales_and_offsets)[1], weight[1])  # a constant group


def test_int4_layer_rows_do_not_depend_on_their_batch():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    layer = Int4WeightOnlyLinear(linear.weight, linear.bias, 64)
    rows = torch.cat([torch.randn(1, 256), torch.randn(40, 256) * 50, torch.zeros(1, 256)])
    with torch.no_grad():
        together = layer(rows)
        for index in range(rows.shape[0]):
            assert torch.equal(layer(rows[index : index + 1])[0], together[index])


def test_int4_loads_text_int4_and_vision_int8(int4_engine):
    model = int4_engine.model
    assert model.weight_formats == {"vision": loading.INT8_FBGEMM, "text": loading.INT4}
    text_layers = [m for m in model.text_model.modules() if isinstance(m, (Int4WeightOnlyLinear, torch.nn.Linear))]
    assert text_layers and all(type(m) is Int4WeightOnlyLinear and m.group_size == 32 for m in text_layers)
    assert model.text_model.lm_head in text_layers
    vision = [m for root in (model.vision_model, model.image_to_text_projection) for m in root.modules()]
    assert any(isinstance(m, RowwiseInt8Linear) for m in vision)
    assert not any(type(m) in (torch.nn.Linear, Int4WeightOnlyLinear) for m in vision)


def test_a_rows_logits_do_not_depend_on_its_neighbours(int4_engine):
    text_model = int4_engine.model.text_model
    torch.manual_seed(1)
    vocabulary = text_model.config.vocab_size
    row = torch.randint(4, vocabulary, (1, 20))
    with torch.inference_mode():
        alone = text_model(input_ids=row).logits
        for neighbours in (torch.randint(4, vocabulary, (3, 20)), torch.randint(4, vocabulary, (7, 20))):
            together = text_model(input_ids=torch.cat([neighbours[:1], row, neighbours[1:]])).logits
            assert torch.equal(together[1], alone[0])


def test_an_int4_answer_does_not_depend_on_its_batch_and_every_task_answers(int4_engine, engine, sample_images):
    tasks = [TaskInput(Task.CAPTION), TaskInput(Task.GROUNDED_VQA, prompt="What is special about this image?"),
             TaskInput(Task.PHRASE_GROUNDING, phrases=("a red circle",)),
             TaskInput(Task.DETECTION, phrases=("a circle", "a star"))]
    requests = [Request(sample_images[i % 3], tasks[i % 4], GenerationParams(max_new_tokens=10 + i)) for i in range(8)]
    alone = [int4_engine.run([request])[0] for request in requests]
    int4_engine.cache.clear()  # the images are encoded again, together this time
    together = int4_engine.run(requests)
    assert [r.raw_text for r in together] == [r.raw_text for r in alone]
    for mine, reference in zip(together, engine.run(requests)):
        assert mine.generated_tokens > 0 and mine.prompt == reference.prompt


def test_int4_is_refused_off_the_cpu_or_from_half_precision(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="int4 runs on the CPU from float32"):
        Engine(EngineSettings(model=str(tiny_model_dir), device="cpu", dtype="bfloat16", quantize="int4"))


def test_a_group_size_that_does_not_divide_the_layers_is_refused(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="int4_group_size 128 does not divide .*KOSMOS_INT4_GROUP_SIZE"):
        Engine(EngineSettings(model=str(tiny_model_dir), device="cpu", quantize="int4", int4_group_size=128))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("quantize", "int5", "'none', 'int8', 'int4' or 'auto'"),
    ("int4_group_size", 48, "int4_group_size must be one of 32, 64, 128; got 48"),
])
def test_bad_quantize_settings_are_refused_by_name(field, value, message):
    with pytest.raises(ValidationError, match=field) as error:
        EngineSettings(**{field: value})
    assert message in str(error.value)


def test_bad_int4_group_size_from_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("KOSMOS_INT4_GROUP_SIZE", "100")
    with pytest.raises(ValidationError, match="int4_group_size must be one of 32, 64, 128; got 100"):
        EngineSettings()
    monkeypatch.setenv("KOSMOS_INT4_GROUP_SIZE", "128")
    assert EngineSettings().int4_group_size == 128
