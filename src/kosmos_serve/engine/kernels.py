"""Weight formats: int8 linear layers whose activations are quantized per row (per token).

`torch.ao.quantization.quantize_dynamic` quantizes a call's activations with one scale and zero
point for the whole tensor, so an int8 row's output depends on what else is in its batch. Here
each row (token) is first mapped affinely onto [0, 1], its own minimum to 0 and maximum to 1
(`u = (x - low) / span`), and fbgemm quantizes the mapped rows on one fixed grid (`INPUT_SCALE`,
`INPUT_ZERO_POINT`: [0, 1] onto [1, 127], the 7 bits `quantize_dynamic`'s layers use), so the int8
product of a row depends on that row alone. The map is undone on the output:
`W x + b = span (W u) + low (W 1) + b`, with `W 1` the dequantized weight's row sums. Each row thus
gets the full range of its own values (per-token asymmetric quantization), which is also more
accurate than one scale per call.

`RowwiseInt8MatmulLinear` does the same with symmetric per-row scales on `torch._int_mm` (oneDNN),
whose int32 sums are exact whatever the batch; `quantize_per_channel` and `quantize_rows` are its
two quantizers.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

TINY_SPAN = 1e-12
INPUT_SCALE = 1 / 126  # the mapped rows' grid: 0 -> 1, 1 -> 127, inside the 7 bits fbgemm's AVX2 kernels need
INPUT_ZERO_POINT = 1


class RowwiseInt8Linear(torch.nn.Module):
    """A dynamic int8 linear layer (per-channel int8 weights) with per-row activation quantization."""

    def __init__(self, quantized: torch.nn.Module):
        super().__init__()
        self.in_features = quantized.in_features
        self.out_features = quantized.out_features
        self._packed = quantized._packed_params._packed_params  # shared, not repacked: no second copy in memory
        weight, bias = quantized._packed_params._weight_bias()
        self.register_buffer("weight_sums", weight.dequantize().sum(dim=1), persistent=False)
        self.register_buffer("bias", torch.zeros(self.out_features) if bias is None else bias.detach().clone(),
                             persistent=False)

    def weight(self) -> torch.Tensor:
        """The int8 weight (per-channel quantized), as torch.ao's dynamic Linear exposes it."""
        return torch.ops.quantized.linear_unpack(self._packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        low, high = torch.aminmax(rows, dim=1, keepdim=True)
        # a constant row gets a tiny span: it maps to 0 everywhere, and the correction below gives back low * W 1
        span = (high - low).clamp_(min=TINY_SPAN)
        unit = (rows - low).div_(span)  # [0, 1]: the maximum maps to exactly 1 (the same rounded difference)
        output = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(  # W u + b
            unit, INPUT_SCALE, INPUT_ZERO_POINT, self._packed)
        output = torch.addcmul(torch.addcmul(self.bias, low, self.weight_sums), output.sub_(self.bias), span)
        return output.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations=int8 per row"


def use_rowwise_activations(model: torch.nn.Module) -> int:
    """Swap every torch.ao dynamic int8 Linear in `model` for a `RowwiseInt8Linear`, in place; how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DynamicLinear):
                setattr(module, name, RowwiseInt8Linear(child))
                swapped += 1
    return swapped


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights, one scale per output channel (row of `weight`): (int8 weight, float32 scales)."""
    scales = weight.abs().amax(dim=1).clamp_(min=TINY_SPAN) / 127
    return torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales.float()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 activations, one scale per row (token): (int8 rows, float32 scales of shape (rows, 1))."""
    scales = x.abs().amax(dim=1, keepdim=True).clamp_(min=TINY_SPAN) / 127
    return torch.round(x / scales).to(torch.int8), scales


class RowwiseInt8MatmulLinear(torch.nn.Module):
    """int8 x int8 products on `torch._int_mm`: weights per channel, activations per row, both symmetric."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        quantized, scales = quantize_per_channel(weight.detach().float())
        self.register_buffer("int8_weight_t", quantized.t().contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        quantized, row_scales = quantize_rows(rows)
        output = torch._int_mm(quantized, self.int8_weight_t).float().mul_(row_scales).mul_(self.scales)
        if self.bias is not None:
            output = output.add_(self.bias)
        return output.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations=int8 per row"


@cache
def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return frozenset()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()
