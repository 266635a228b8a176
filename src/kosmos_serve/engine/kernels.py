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

`Int4WeightOnlyLinear` keeps 4-bit weights in groups along the input (asymmetric: a scale and an offset per
group of `group_size` inputs) and leaves activations in floating point, cast to bfloat16 for ATen's CPU kernel
`_weight_int4pack_mm_for_cpu`, which dequantizes the weights as it multiplies. Nothing is quantized per call,
so a row's answer cannot depend on its batch neighbours.
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

    def weight(self) -> torch.Tensor:
        """The int8 weight (out, in), a method as on `RowwiseInt8Linear`: model code that checks whether
        `layer.weight` is a tensor (Kosmos-2.5's vision MLP does, to cast its input) leaves the layer alone."""
        return self.int8_weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        quantized, row_scales = quantize_rows(rows)
        output = torch._int_mm(quantized, self.int8_weight_t).float().mul_(row_scales).mul_(self.scales)
        if self.bias is not None:
            output = output.add_(self.bias)
        return output.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations=int8 per row"


INT4_PACK_ROWS = 16  # `_convert_weight_to_int4pack_for_cpu` packs output channels in blocks of 16
INT4_LEVELS = 15  # 4 bits: 0..15, with 8 at the group's offset (the kernel reads w = (q - 8) * scale + offset)


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit weights per group of `group_size` inputs: (levels 0..15 as int32, scales and offsets).

    The scales and offsets have shape (in / group_size, out, 2), as the int4 kernels take them; each group's
    minimum and maximum map to levels 0 and 15.
    """
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"int4 groups of {group_size} do not divide a layer's {in_features} inputs")
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    low, high = torch.aminmax(groups, dim=-1, keepdim=True)
    scales = ((high - low) / INT4_LEVELS).clamp_(min=TINY_SPAN)
    levels = torch.round((groups - low) / scales).clamp_(0, INT4_LEVELS).to(torch.int32)
    offsets = low + 8 * scales
    scales_and_offsets = torch.cat([scales, offsets], dim=-1).transpose(0, 1).contiguous()
    return levels.reshape(out_features, in_features), scales_and_offsets


def dequantize_int4_groups(levels: torch.Tensor, scales_and_offsets: torch.Tensor) -> torch.Tensor:
    """The float weight that `quantize_int4_groups`' levels and scales stand for (the kernel's own formula)."""
    out_features, in_features = levels.shape
    group_count = scales_and_offsets.shape[0]
    scales, offsets = scales_and_offsets.float().transpose(0, 1).unbind(-1)  # (out, groups) each
    groups = levels.reshape(out_features, group_count, in_features // group_count).float()
    return ((groups - 8) * scales[..., None] + offsets[..., None]).reshape(out_features, in_features)


class Int4WeightOnlyLinear(torch.nn.Module):
    """4-bit weights in groups along the input, bfloat16 activations: ATen's `_weight_int4pack_mm_for_cpu`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        levels, scales_and_offsets = quantize_int4_groups(weight.detach().float(), group_size)
        padding = -self.out_features % INT4_PACK_ROWS  # e.g. the output layer's 65037 words
        levels = torch.nn.functional.pad(levels, (0, 0, 0, padding))
        scales_and_offsets = torch.nn.functional.pad(scales_and_offsets, (0, 0, 0, padding))
        self.register_buffer("packed_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1))
        self.register_buffer("scales_and_offsets", scales_and_offsets.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def weight_bytes(self) -> int:
        """Bytes read per call: the packed 4-bit weight with its scales and offsets."""
        return sum(t.numel() * t.element_size() for t in (self.packed_weight, self.scales_and_offsets))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        output = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed_weight, self.group_size,
                                                            self.scales_and_offsets)
        output = output[:, : self.out_features]
        # back to the caller's dtype, in the same pass as the bias where there is one (float32 + bfloat16 -> float32)
        output = output.to(x.dtype) if self.bias is None else torch.add(self.bias.to(x.dtype), output)
        return output.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of "
                f"{self.group_size}, activations=bfloat16")


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
