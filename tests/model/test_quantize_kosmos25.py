"""int8 and auto weights on a Kosmos-2.5: every linear layer of its vision encoder, projection and text decoder
converted, an answer independent of its batch neighbours (pages of other patch counts), and `/info` saying so."""

import time

import httpx
import pytest
import torch
from local_server import serve_in_thread

from kosmos_serve.asgi import create_app
from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.engine import Engine, GenerationParams, ImageFeatureCache, Request, loading
from kosmos_serve.engine.kernels import RowwiseInt8Linear, RowwiseInt8MatmulLinear
from kosmos_serve.tasks import Task, TaskInput

QUANTIZED = (RowwiseInt8Linear, RowwiseInt8MatmulLinear)


def quantized_engine(model_dir, quantize: str, kind: str | None = None) -> Engine:
    """An engine on the tiny Kosmos-2.5 with `quantize`; for auto, as if on a CPU of `kind`."""
    with pytest.MonkeyPatch.context() as patch:
        if kind:
            patch.setattr(loading, "cpu_kind", lambda flags, capability: kind)
        return Engine(EngineSettings(model=str(model_dir), device="cpu", quantize=quantize, max_batch_rows=8))


@pytest.fixture(scope="module", params=[("int8", None), ("auto", "avx512_vnni"), ("auto", "avx2")],
                ids=["int8", "auto-avx512_vnni", "auto-avx2"])
def k25_quantized(request, tiny_kosmos25_dir):
    quantize, kind = request.param
    return quantize, kind, quantized_engine(tiny_kosmos25_dir, quantize, kind)


def test_every_linear_layer_of_each_part_is_converted(k25_quantized):
    quantize, kind, engine = k25_quantized
    formats = loading.AUTO_FORMATS[kind] if kind else {"vision": loading.INT8_FBGEMM, "text": loading.INT8_FBGEMM}
    assert engine.model.weight_formats == formats
    classes = {loading.INT8_FBGEMM: RowwiseInt8Linear, loading.INT8_MATMUL: RowwiseInt8MatmulLinear}
    model = engine.model
    # Kosmos-2.5's layers: the vision encoder's patch projection, attention (query, key, value, output) and gated
    # MLP (wi_0, wi_1, wo); the projection's dense layer and cross-attention; the decoder's attention, fc1, fc2, lm_head
    parts = {"vision": [model.vision_model, model.image_to_text_projection], "text": [model.text_model]}
    for part, roots in parts.items():
        layers = {name: m for root in roots for name, m in root.named_modules() if isinstance(m, QUANTIZED)}
        assert layers and all(type(layer) is classes[formats[part]] for layer in layers.values()), (quantize, part)
        assert not any(type(m) is torch.nn.Linear for root in roots for m in root.modules())
    vision = {name.rsplit(".", 1)[-1] for name, m in model.vision_model.named_modules() if isinstance(m, QUANTIZED)}
    assert {"patch_projection", "query", "key", "value", "output", "wi_0", "wi_1", "wo"} <= vision
    text = {name.rsplit(".", 1)[-1] for name, m in model.text_model.named_modules() if isinstance(m, QUANTIZED)}
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "lm_head"} <= text


def test_a_quantized_reading_does_not_depend_on_its_batch_neighbours(k25_quantized, kosmos25_pages):
    _, _, engine = k25_quantized
    tasks = [TaskInput(Task.OCR), TaskInput(Task.MARKDOWN)]
    requests = [Request(page, tasks[i % 2], GenerationParams(max_new_tokens=16 + i))
                for i, page in enumerate(kosmos25_pages + kosmos25_pages[::-1])]
    engine.cache = ImageFeatureCache(0)  # each page encoded again, alone and then beside the others
    alone = [engine.run([request])[0] for request in requests]
    together = engine.run(requests)
    assert [(r.raw_text, r.lines, r.generated_tokens) for r in together] == \
           [(r.raw_text, r.lines, r.generated_tokens) for r in alone]
    assert all(r.generated_tokens > 0 for r in together)
    readings = {r.raw_text.removeprefix(r.prompt) for r in together}
    assert len(readings) > 1  # guards the equality: the readings differ with the page


def test_info_reports_the_quantized_formats(k25_quantized):
    quantize, _, engine = k25_quantized
    app = create_app(ServerSettings(demo=False), engine.settings, engine=engine)
    with serve_in_thread(app) as url:
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        info = httpx.get(f"{url}/info").json()
    assert info["family"] == "Kosmos-2.5" and info["quantize"] == quantize
    assert info["weight_formats"] == engine.model.weight_formats
