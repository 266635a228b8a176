"""Which linear-layer kernel is fastest on this CPU, per part of Kosmos-2, and where a decode step's time goes.

    python benchmarks/linear_kernels.py                    # the kernel table (full-size shapes; ~10 minutes on 2 cores)
    python benchmarks/linear_kernels.py --profile          # torch.profiler over decode steps of the full-size model
    python benchmarks/linear_kernels.py --parts decode --repeats 3

Each part is timed on its own shapes: a layer is the six matrix products of one transformer layer
(q, k, v, out, fc1, fc2), the vision encoder's (1024 wide, MLP 4096) on 257 rows per image, the text
decoder's (2048 wide, MLP 8192) on prefill's 75-600 rows and decode's 1-32 rows. Several layers with
distinct weights are swept in turn, so a layer's weights are cold in cache as in the model (24 layers
do not fit in any cache), and the median sweep gives the time per layer. Each kernel is also checked
for batch independence: the first row computed alone must equal the same row inside the batch, bit
for bit (a token at decode, a prompt of 75 tokens at prefill, an image's 257 rows in vision, each
alone against inside the part's largest batch). The CPU and its extensions are printed first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench import FULL_MODEL_DIR, cpu_description, fresh_images

from kosmos_serve.engine import kernels


@dataclass(frozen=True)
class Part:
    width: int
    mlp: int
    rows: tuple[int, ...]
    layers: int  # distinct layers swept, enough to leave the cache cold


PARTS = {
    "vision": Part(1024, 4096, (257, 4 * 257), 4),
    "prefill": Part(2048, 8192, (75, 600), 2),
    "decode": Part(2048, 8192, (1, 8, 32), 4),
}
LM_HEAD = (2048, 65037)  # the text decoder's output layer: decode reads all of it every step


def layer_shapes(part: Part) -> list[tuple[int, int]]:
    """(in, out) of q, k, v, out, fc1, fc2."""
    return [(part.width, part.width)] * 4 + [(part.width, part.mlp), (part.mlp, part.width)]


def float_linear(dtype: torch.dtype) -> Callable:
    def prepare(weight: torch.Tensor, bias: torch.Tensor):
        weight, bias = weight.to(dtype), bias.to(dtype)
        return lambda x: F.linear(x, weight, bias)
    return prepare


def fbgemm_dynamic(engine: str, per_row: bool) -> Callable:
    """torch.ao's dynamic int8 linear (quantize_dynamic's kernel), packed under `engine`; per call or per row."""
    def prepare(weight: torch.Tensor, bias: torch.Tensor):
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.weight.data, linear.bias.data = weight, bias
        linear.qconfig = per_channel_dynamic_qconfig
        previous, torch.backends.quantized.engine = torch.backends.quantized.engine, engine
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dynamic = DynamicLinear.from_float(linear)
        finally:
            torch.backends.quantized.engine = previous
        return kernels.RowwiseInt8Linear(dynamic) if per_row else dynamic
    return prepare


class WeightOnlyInt8Linear(torch.nn.Module):
    """int8 weights (per channel), activations kept in float: ATen's `_weight_int8pack_mm`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        quantized, scales = kernels.quantize_per_channel(weight.detach().float())
        self.register_buffer("int8_weight", quantized)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        output = torch.ops.aten._weight_int8pack_mm(rows, self.int8_weight, self.scales.to(rows.dtype))
        if self.bias is not None:
            output = output.add_(self.bias)
        return output.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations=float"


def weight_only_int8(activations: torch.dtype) -> Callable:
    def prepare(weight: torch.Tensor, bias: torch.Tensor):
        return WeightOnlyInt8Linear(weight, bias).to(activations)
    return prepare


def int_mm_per_row(weight: torch.Tensor, bias: torch.Tensor):
    return kernels.RowwiseInt8MatmulLinear(weight, bias)


def onednn_qlinear_per_row(weight: torch.Tensor, bias: torch.Tensor):
    """oneDNN's int8 linear (inductor's x86 quantizer's kernel) on rows scaled symmetrically to [-127, 127]."""
    quantized_weight, weight_scales = kernels.quantize_per_channel(weight)
    packed = torch.ops.onednn.qlinear_prepack(quantized_weight, None)
    zero_points = torch.zeros_like(weight_scales, dtype=torch.int64)

    def run(x: torch.Tensor) -> torch.Tensor:
        q, scales = kernels.quantize_rows(x)  # unsigned with zero point 128: oneDNN's fast path (signed is ~100x slower)
        out = torch.ops.onednn.qlinear_pointwise((q.to(torch.int16) + 128).to(torch.uint8), 1.0, 128, packed,
                                                 weight_scales, zero_points, None, 1.0, 0, torch.float32, "none", [], "")
        return torch.addcmul(bias, out, scales)
    return run


def int4_groups(group_size: int) -> Callable:
    """`Int4WeightOnlyLinear`: 4-bit weights in groups of `group_size` inputs, bfloat16 activations."""
    def prepare(weight: torch.Tensor, bias: torch.Tensor):
        return kernels.Int4WeightOnlyLinear(weight, bias, group_size)
    return prepare


def torchao_config(name: str) -> Callable:
    def prepare(weight: torch.Tensor, bias: torch.Tensor):
        import torchao.quantization as ao

        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.weight.data, linear.bias.data = weight.clone(), bias.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ao.quantize_(linear, getattr(ao, name)())
        return linear
    return prepare


CANDIDATES: dict[str, tuple[Callable, torch.dtype]] = {
    "float32": (float_linear(torch.float32), torch.float32),
    "bfloat16 (oneDNN)": (float_linear(torch.bfloat16), torch.bfloat16),
    "int8 dyn., fbgemm engine, per call": (fbgemm_dynamic("fbgemm", per_row=False), torch.float32),
    "int8 dyn., fbgemm engine, per row (RowwiseInt8Linear)": (fbgemm_dynamic("fbgemm", per_row=True), torch.float32),
    "int8 dyn., x86 engine, per row": (fbgemm_dynamic("x86", per_row=True), torch.float32),
    "int8 dyn., onednn engine, per call": (fbgemm_dynamic("onednn", per_row=False), torch.float32),
    "int8 weight-only `_weight_int8pack_mm`, fp32 act.": (weight_only_int8(torch.float32), torch.float32),
    "int8 weight-only `_weight_int8pack_mm`, bf16 act.": (weight_only_int8(torch.bfloat16), torch.bfloat16),
    "int8 x int8 `torch._int_mm`, per row": (int_mm_per_row, torch.float32),
    "int8 oneDNN `qlinear_pointwise`, per row": (onednn_qlinear_per_row, torch.float32),
    "int4 weight-only, groups of 32 (Int4WeightOnlyLinear)": (int4_groups(32), torch.float32),
    "int4 weight-only, groups of 64 (Int4WeightOnlyLinear)": (int4_groups(64), torch.float32),
    "int4 weight-only, groups of 128 (Int4WeightOnlyLinear)": (int4_groups(128), torch.float32),
    "torchao Int8DynamicActivationInt8Weight": (torchao_config("Int8DynamicActivationInt8WeightConfig"), torch.float32),
    "torchao Int8WeightOnly": (torchao_config("Int8WeightOnlyConfig"), torch.float32),
}


def sweep_seconds(layers: list[list[Callable]], x_by_width: dict[int, torch.Tensor], repeats: int) -> float:
    """Median seconds of one pass over every layer's six products (activations stay hot, weights cold)."""
    def sweep():
        for layer in layers:
            for run, width in layer:
                run(x_by_width[width])
    sweep()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        sweep()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def batch_independent(run: Callable, x: torch.Tensor, alone: int) -> bool:
    """Are the first `alone` rows (one token, prompt or image) the same bit for bit alone and inside the batch `x`?"""
    if x.shape[0] == alone:
        x = torch.cat([x, torch.randn_like(x) * 3, x * 0.01])
    return torch.equal(run(x[:alone]), run(x)[:alone])


def measure_part(name: str, part: Part, candidates: list[str], repeats: int) -> dict:
    torch.manual_seed(0)
    weights = [[(torch.randn(out, inp) / inp**0.5, torch.randn(out) * 0.02) for inp, out in layer_shapes(part)]
               for _ in range(part.layers)]
    results = {}
    for candidate in candidates:
        prepare, dtype = CANDIDATES[candidate]
        try:
            layers = [[(prepare(w, b), w.shape[1]) for w, b in layer] for layer in weights]
            per_rows = {}
            for rows in part.rows:
                x_by_width = {width: torch.randn(rows, width).to(dtype) for width in (part.width, part.mlp)}
                seconds = sweep_seconds(layers, x_by_width, repeats) / part.layers
                independent = all(batch_independent(run, x_by_width[width], part.rows[0]) for run, width in layers[0])
                per_rows[rows] = (seconds, independent)
            results[candidate] = per_rows
        except (RuntimeError, NotImplementedError, ImportError, AssertionError, TypeError) as error:
            results[candidate] = f"fails: {str(error).splitlines()[0][:90]}"
        print(f"  {name} {candidate}: {results[candidate]}", file=sys.stderr, flush=True)
        del layers
    return results


def measure_lm_head(candidates: list[str], repeats: int) -> dict:
    torch.manual_seed(0)
    weight, bias = torch.randn(LM_HEAD[1], LM_HEAD[0]) / LM_HEAD[0] ** 0.5, torch.zeros(LM_HEAD[1])
    results = {}
    for candidate in candidates:
        prepare, dtype = CANDIDATES[candidate]
        try:
            layer = [[(prepare(weight, bias), LM_HEAD[0])]]
            results[candidate] = {rows: (sweep_seconds(layer, {LM_HEAD[0]: torch.randn(rows, LM_HEAD[0]).to(dtype)},
                                                       repeats), None) for rows in (1, 8)}
        except (RuntimeError, NotImplementedError, ImportError, AssertionError, TypeError) as error:
            results[candidate] = f"fails: {str(error).splitlines()[0][:90]}"
        print(f"  lm_head {candidate}: {results[candidate]}", file=sys.stderr, flush=True)
    return results


def render(name: str, per_candidate: dict, unit: str) -> str:
    rows = next(iter(v for v in per_candidate.values() if isinstance(v, dict)))
    base = per_candidate.get("float32")
    lines = [f"| {name}: {unit} | " + " | ".join(f"{r} rows" for r in rows) + " |",
             "| --- " * (len(rows) + 1) + "|"]
    for candidate, result in per_candidate.items():
        if isinstance(result, str):
            lines.append(f"| {candidate} | " + " | ".join([result] + [""] * (len(rows) - 1)) + " |")
            continue
        cells = []
        for r, (seconds, independent) in result.items():
            ratio = f" ({base[r][0] / seconds:.2f}x)" if isinstance(base, dict) else ""
            flag = "" if independent is None else (" =" if independent else " **≠**")
            cells.append(f"{seconds * 1000:.2f} ms{ratio}{flag}")
        lines.append(f"| {candidate} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_decode(quantize: str, batch: int, steps: int) -> str:
    """Where a decode step's time goes: torch.profiler over `steps` scheduler steps of the full-size model."""
    from torch.profiler import ProfilerActivity, profile

    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine, GenerationParams, Request
    from kosmos_serve.tasks import Task, TaskInput

    engine = Engine(EngineSettings(model=str(FULL_MODEL_DIR), device="cpu", quantize=quantize, max_batch_rows=batch))
    params = GenerationParams(max_new_tokens=steps + 6, no_repeat_ngram_size=3)
    scheduler = engine.scheduler()
    for image in fresh_images(batch, seed=5):
        scheduler.add(Request(image, TaskInput(Task.CAPTION), params))
    for _ in range(3):  # prefill, then two warm steps
        scheduler.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        began = time.perf_counter()
        for _ in range(steps):
            scheduler.step()
        per_step = (time.perf_counter() - began) / steps
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)
    return (f"#### --quantize {quantize}, batch {batch}: {per_step * 1000:.0f} ms per step ({steps} steps, "
            f"under the profiler)\n\n```\n{table}\n```")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="vision,prefill,decode,lm_head")
    parser.add_argument("--candidates", help="semicolon-separated subset of the candidate names (default: all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, the cores)")
    parser.add_argument("--profile", action="store_true", help="profile decode steps of the full-size model instead")
    parser.add_argument("--quantize", default="int8,int4", help="formats to profile with --profile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_description()}; {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"quantized engine {torch.backends.quantized.engine}\n")
    if args.profile:
        for quantize in args.quantize.split(","):
            for batch in (1, 8):
                print(profile_decode(quantize, batch, steps=8) + "\n", flush=True)
        return
    candidates = args.candidates.split(";") if args.candidates else list(CANDIDATES)
    for name in args.parts.split(","):
        if name == "lm_head":
            print(render("lm_head 2048x65037", measure_lm_head(candidates, args.repeats), "ms per call") + "\n",
                  flush=True)
        else:
            print(render(name, measure_part(name, PARTS[name], candidates, args.repeats), "ms per layer") + "\n",
                  flush=True)
    print("Each cell: time per layer (six products), its speed-up over float32, and **≠** where a row's output "
          "changes with its batch.")


if __name__ == "__main__":
    main()
