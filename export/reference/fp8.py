"""Weight-only FP8 (e4m3fn) linear layers with the official dequantization (spec §1.4).

The release stores each quantized Linear as an e4m3fn weight plus one fp32 scale per output row. The
official deploy path forms W_eff = bf16(bf16(q) * bf16(s)) -- both factors cast to the activation dtype,
the product rounded once in bf16 -- and then runs an ordinary bf16 GEMM. We reproduce that exactly.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

E4M3_MAX = 448.0
SCALE_FLOOR = 1e-8
FP8_DTYPE = torch.float8_e4m3fn
COMPUTE_DTYPE = torch.bfloat16


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row round-to-nearest e4m3 quantization: s = max(max|w_row|/448, 1e-8), q = e4m3(clamp(w/s)).

    Computed in fp32. The clamp matters: torch's fp32 -> e4m3fn cast does not saturate.
    """
    w = weight.detach().to(torch.float32)
    scale = torch.clamp(w.abs().amax(dim=1) / E4M3_MAX, min=SCALE_FLOOR)
    q = torch.clamp(w / scale[:, None], -E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """W_eff = dtype(dtype(q) * dtype(s)) with the scale broadcast over each output row."""
    return q.to(dtype) * scale.to(dtype)[:, None]


class FP8Linear(nn.Module):
    """Drop-in for nn.Linear whose parameters have the checkpoint's names: weight (e4m3), weight_scale, bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=COMPUTE_DTYPE, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.weight, self.weight_scale, x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def swap_linears(module: nn.Module, quantized: set[str], prefix: str = "") -> int:
    """Replace every nn.Linear whose qualified name is in `quantized` by an FP8Linear (in place).

    Mirrors the official loader: only Linears whose `<name>.weight_scale` exists in the checkpoint are
    swapped, so any subset of quantized layers is tolerated. Returns how many were swapped.
    """
    count = 0
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        if isinstance(child, nn.Linear) and full in quantized:
            setattr(module, name, FP8Linear(child.in_features, child.out_features, child.bias is not None,
                                            device=child.weight.device))
            count += 1
        else:
            count += swap_linears(child, quantized, f"{full}.")
    return count
