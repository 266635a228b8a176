"""int8 activation scales per call (torch.ao `quantize_dynamic`) against per row (`RowwiseInt8Linear`).

Times the linear layers of the full-size Kosmos-2 text decoder (24 layers: q, k, v, out 2048x2048,
fc1 2048->8192, fc2 8192->2048; and the 2048->65037 output layer) at 1, 8 and 76 rows (a decode
step alone, a decode step of 8 rows, a prefill), each layer's best of a few calls interleaved, random weights; and checks
that a row's output is the same alone and in a batch. Run: `python benchmarks/int8_rows.py`.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

from kosmos_serve.engine.kernels import RowwiseInt8Linear

SHAPES = [(2048, 2048)] * 4 + [(2048, 8192), (8192, 2048)]  # (in, out) of one decoder layer


def build(layers: int):
    """The first layer in float32 (for the error check), and every layer as int8 per call and per row."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    shapes = [shape for _ in range(layers) for shape in SHAPES] + [(2048, 65037)]
    first, dynamic = None, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, (i, o) in enumerate(shapes):
            layer = torch.nn.Linear(i, o, bias=index < len(shapes) - 1)  # the output layer has no bias
            first = first or layer
            dynamic.append(quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                            dtype=torch.qint8)[0])
    return first, dynamic, [RowwiseInt8Linear(layer) for layer in dynamic]


@torch.inference_mode()
def time_sweeps(dynamic, rowwise, rows: int, repeats: int) -> tuple[float, float]:
    """Best time of whole sweeps over every layer (weights cold in cache, as in a decode step), interleaved."""
    inputs = [torch.randn(rows, layer.in_features) for layer in dynamic]
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for slot, layers in enumerate((dynamic, rowwise)):
            began = time.perf_counter()
            for layer, x in zip(layers, inputs):
                layer(x)
            best[slot] = min(best[slot], time.perf_counter() - began)
    return best[0], best[1]


@torch.inference_mode()
def time_both(dynamic, rowwise, rows: int, repeats: int) -> tuple[float, float]:
    """Sum over layers of each layer's best time in each format, the two interleaved call by call.

    Per-layer minima make the figure robust to a shared machine's bursts of load.
    """
    totals = [0.0, 0.0]
    for per_call, per_row in zip(dynamic, rowwise):
        x = torch.randn(rows, per_call.in_features)
        per_call(x), per_row(x)
        best = [float("inf"), float("inf")]
        for _ in range(repeats):
            for slot, layer in enumerate((per_call, per_row)):
                began = time.perf_counter()
                layer(x)
                best[slot] = min(best[slot], time.perf_counter() - began)
        totals[0] += best[0]
        totals[1] += best[1]
    return totals[0], totals[1]


@torch.inference_mode()
def check(dense, dynamic, rowwise) -> None:
    x = torch.randn(8, 2048) * torch.rand(8, 1) * 4
    reference = dense(x)
    for name, layers in (("per call", dynamic), ("per row", rowwise)):
        error = float((layers[0](x) - reference).norm() / reference.norm())
        alone = all(torch.equal(layer(x)[i : i + 1], layer(x[i : i + 1])) for layer in (layers[0], layers[-1])
                    for i in range(8))
        print(f"  {name:8s}: relative error {error:.4f} (2048x2048); every row alone == in a batch of 8 "
              f"(2048x2048 and the output layer): {alone}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the cores)")
    parser.add_argument("--cold", action="store_true",
                        help="time whole sweeps over the layers (weights cold in cache) instead of each layer's best")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    dense, dynamic, rowwise = build(args.layers)
    check(dense, dynamic, rowwise)
    print("| rows | int8, one scale per call | int8, scale per row | per row / per call |")
    print("| --- | --- | --- | --- |")
    for rows in (1, 8, 76):
        per_call, per_row = (time_sweeps if args.cold else time_both)(dynamic, rowwise, rows, args.repeats)
        print(f"| {rows} | {per_call * 1000:.0f} ms | {per_row * 1000:.0f} ms | {per_row / per_call:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
