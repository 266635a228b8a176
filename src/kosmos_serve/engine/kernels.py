"""Weight formats: int8 linear layers whose activation scales are per row (per token), on fbgemm's kernels.

`torch.ao.quantization.quantize_dynamic` quantizes a call's activations with one scale and zero
point for the whole tensor, so an int8 row's output depends on what else is in its batch. Here
each row (token) is first mapped affinely onto [-1, 1], its own minimum to -1 and maximum to 1
(`x' = a x + b`). Every row of every call then spans exactly [-1, 1], so fbgemm's per-tensor
dynamic quantization chooses the same grid whatever the batch, and the int8 product of a row
depends on that row alone. The map is undone on the output: `W x = (W x' - b W 1) / a`, with
`W 1` the dequantized weight's row sums. Each row thus gets the full 8-bit range of its own
values (per-token asymmetric quantization), which is also more accurate than one scale per call.
fbgemm's kernels are called exactly as `quantize_dynamic`'s layers call them (`reduce_range=True`).
"""

from __future__ import annotations

import torch

TINY_SPAN = 1e-12
MINUS_ONE = torch.tensor(-1.0)


class RowwiseInt8Linear(torch.nn.Module):
    """A dynamic int8 linear layer (per-channel int8 weights) with per-row activation quantization."""

    def __init__(self, quantized: torch.nn.Module):
        super().__init__()
        self.in_features = quantized.in_features
        self.out_features = quantized.out_features
        self._packed = quantized._packed_params._packed_params
        weight, bias = quantized._packed_params._weight_bias()
        self.register_buffer("weight_sums", weight.dequantize().sum(dim=1), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    @classmethod
    def from_dynamic(cls, quantized: torch.nn.Module) -> RowwiseInt8Linear:
        return cls(quantized)

    def weight(self) -> torch.Tensor:
        """The int8 weight (per-channel quantized), as torch.ao's dynamic Linear exposes it."""
        return torch.ops.quantized.linear_unpack(self._packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        high, top = rows.max(dim=1, keepdim=True)
        low, bottom = rows.min(dim=1, keepdim=True)
        # a constant row gets a huge scale: it maps to -1 everywhere (its top pinned to 1), and the
        # correction below gives back low * W 1 to float precision
        scale = 2 / (high - low).clamp_(min=TINY_SPAN)
        shift = torch.addcmul(MINUS_ONE, low, scale, value=-1)  # -1 - low * scale
        mapped = torch.addcmul(shift, rows, scale).clamp_(-1, 1)
        mapped.scatter_(1, bottom, -1.0).scatter_(1, top, 1.0)  # each row spans exactly [-1, 1], whatever rounding did
        output = torch.ops.quantized.linear_dynamic(mapped, self._packed, True)  # a (W x) + shift W 1 + bias
        if self.bias is None:
            output = output.sub_(shift * self.weight_sums).mul_(scale.reciprocal_())
        else:
            output = torch.addcmul(self.bias, output.sub_(torch.addcmul(self.bias, shift, self.weight_sums)),
                                   scale.reciprocal_())
        return output.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations=int8 per row"


def use_rowwise_activations(model: torch.nn.Module) -> int:
    """Swap every torch.ao dynamic int8 Linear in `model` for a `RowwiseInt8Linear`, in place; how many."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DynamicLinear):
                setattr(module, name, RowwiseInt8Linear(child))
                swapped += 1
    return swapped
