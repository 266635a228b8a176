"""--quantize auto: per part, the format measured fastest on this CPU kind; answers stay independent of the batch."""

import pytest
import torch

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, Request, loading
from kosmos_serve.engine.kernels import RowwiseInt8Linear, RowwiseInt8MatmulLinear, cpu_features
from kosmos_serve.tasks import Task, TaskInput

LINEAR_CLASS = {loading.INT8_FBGEMM: RowwiseInt8Linear, loading.INT8_MATMUL: RowwiseInt8MatmulLinear,
                loading.FLOAT32: torch.nn.Linear}


def auto_engine(model_dir, kind: str) -> Engine:
    """An auto engine loaded as if on a CPU of `kind` (each kind's kernels run on any x86 CPU torch supports)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loading, "cpu_kind", lambda flags, capability: kind)
        return Engine(EngineSettings(model=str(model_dir), device="cpu", quantize="auto", max_batch_rows=8))


@pytest.fixture(scope="module", params=["avx512_vnni", "avx2"])
def kind_engine(request, tiny_model_dir):
    return request.param, auto_engine(tiny_model_dir, request.param)


def test_auto_picks_this_cpus_row_of_the_table_and_reports_it(tiny_model_dir):
    engine = Engine(EngineSettings(model=str(tiny_model_dir), device="cpu", quantize="auto"))
    kind = loading.cpu_kind(cpu_features(), torch.backends.cpu.get_cpu_capability())
    assert engine.model.weight_formats == loading.AUTO_FORMATS[kind]


def test_each_part_gets_its_formats_layers(kind_engine):
    kind, engine = kind_engine
    parts = {"vision": [engine.model.vision_model, engine.model.image_to_text_projection],
             "text": [engine.model.text_model]}
    for part, roots in parts.items():
        expected = LINEAR_CLASS[loading.AUTO_FORMATS[kind][part]]
        layers = [m for root in roots for m in root.modules() if isinstance(m, tuple(LINEAR_CLASS.values()))]
        assert layers and all(type(layer) is expected for layer in layers), (kind, part)


def test_an_auto_answer_does_not_depend_on_its_batch(kind_engine, sample_images):
    _, engine = kind_engine
    tasks = [TaskInput(Task.CAPTION), TaskInput(Task.GROUNDED_VQA, prompt="What is special about this image?"),
             TaskInput(Task.PHRASE_GROUNDING, phrases=("a red circle",))]
    requests = [Request(sample_images[i % 3], tasks[i % 3], GenerationParams(max_new_tokens=10 + i)) for i in range(8)]
    alone = [engine.run([request])[0] for request in requests]
    engine.cache.clear()  # the images are encoded again, together this time
    together = engine.run(requests)
    assert [r.raw_text for r in together] == [r.raw_text for r in alone]
    assert all(r.generated_tokens > 0 for r in together)


def test_auto_answers_like_float32_does(kind_engine, engine, sample_images):
    _, auto = kind_engine
    requests = [Request(image, TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=8)) for image in sample_images]
    for mine, reference in zip(auto.run(requests), engine.run(requests)):
        assert mine.prompt == reference.prompt and mine.generated_tokens > 0


@pytest.mark.parametrize(("flags", "capability", "kind"), [
    ({"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}, "AVX512", "avx512_vnni"),
    ({"avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_bf16", "amx_int8"}, "AVX512", "avx512_vnni"),
    ({"avx2", "avx512f", "avx512bw", "avx512_vnni"}, "AVX2", "avx2"),  # torch built or run without AVX-512
    ({"avx2", "fma"}, "AVX2", "avx2"),
    ({"sse4_2"}, "DEFAULT", "other"),
])
def test_cpu_kind_from_flags_and_torchs_capability(flags, capability, kind):
    assert loading.cpu_kind(frozenset(flags), capability) == kind


def test_auto_keeps_the_loaded_dtype_off_the_cpu_or_in_half_precision():
    settings = EngineSettings(quantize="auto")
    assert loading.weight_formats(settings, torch.device("cuda"), torch.bfloat16) == {"vision": "bfloat16",
                                                                                      "text": "bfloat16"}
    assert loading.weight_formats(settings, torch.device("cpu"), torch.bfloat16) == {"vision": "bfloat16",
                                                                                     "text": "bfloat16"}


def test_int_mm_layer_is_close_to_float_and_row_independent():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    layer = RowwiseInt8MatmulLinear(linear.weight, linear.bias)
    rows = torch.cat([torch.randn(1, 256), torch.randn(20, 256) * 50, torch.zeros(1, 256), torch.full((1, 256), 3.0)])
    with torch.no_grad():
        expected, together = linear(rows), layer(rows)
    assert ((together - expected).norm() / expected.norm()) < 0.02
    for index in range(rows.shape[0]):
        assert torch.equal(layer(rows[index : index + 1])[0], together[index])
