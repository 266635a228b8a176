"""int8 weights: they load, answer every task, and are refused where their kernels do not run."""

import pytest
import torch

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, Request
from kosmos_serve.engine.kernels import RowwiseInt8Linear
from kosmos_serve.errors import ModelLoadError
from kosmos_serve.tasks import Task, TaskInput

TASKS = [
    TaskInput(Task.CAPTION),
    TaskInput(Task.PHRASE_GROUNDING, phrases=("a red circle",)),
    TaskInput(Task.REFERRING_GENERATION, boxes=((10, 20, 150, 160),)),
    TaskInput(Task.REGION_VQA, prompt="Where is the fire next to?", phrases=("the fire",), boxes=((5, 5, 120, 90),)),
    TaskInput(Task.DETECTION, phrases=("a circle", "a star")),
]


@pytest.fixture(scope="module")
def int8_engine(tiny_model_dir):
    return Engine(EngineSettings(model=str(tiny_model_dir), device="cpu", quantize="int8"))


def test_every_linear_layer_is_int8(int8_engine):
    modules = list(int8_engine.model.modules())
    quantized = [m for m in modules if isinstance(m, RowwiseInt8Linear)]
    assert quantized and not any(type(m) is torch.nn.Linear for m in modules)
    assert all(m.weight().dtype == torch.qint8 for m in quantized)


def test_int8_answers_every_task(int8_engine, engine, sample_images):
    params = GenerationParams(max_new_tokens=12)
    requests = [Request(sample_images[0], task, params) for task in TASKS]
    int8_results = int8_engine.run(requests)
    fp32_results = engine.run(requests)
    for int8, fp32 in zip(int8_results, fp32_results):
        assert int8.generated_tokens > 0 and int8.prompt == fp32.prompt
    given_box = int8_results[2].entities[0]  # the box we gave comes back through the prompt, not the weights
    assert given_box.phrase == "It" and given_box.pixel_boxes == fp32_results[2].entities[0].pixel_boxes


def test_int8_is_refused_off_the_cpu_or_from_half_precision(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="int8 runs on the CPU from float32"):
        Engine(EngineSettings(model=str(tiny_model_dir), device="cpu", dtype="bfloat16", quantize="int8"))


@pytest.mark.parametrize("bias", [True, False])
def test_fbgemm_row_layer_is_close_to_float_and_row_independent(bias):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=bias)
    dynamic = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig},
                               dtype=torch.qint8)[0]
    assert isinstance(dynamic, DynamicLinear)
    layer = RowwiseInt8Linear(dynamic)
    rows = torch.cat([torch.randn(1, 256), torch.randn(20, 256) * 50 + 7,
                      torch.zeros(1, 256), torch.full((1, 256), 3.0)])  # the last two constant
    with torch.no_grad():
        expected, together = linear(rows), layer(rows)
    assert ((together - expected).norm() / expected.norm()) < 0.02
    dequantized = torch.nn.functional.linear(rows[-2:], layer.weight().dequantize(), linear.bias)
    assert torch.allclose(together[-2:], dequantized, atol=1e-4)  # a constant row: its int8 weights' exact product
    for index in range(rows.shape[0]):
        assert torch.equal(layer(rows[index : index + 1])[0], together[index])
