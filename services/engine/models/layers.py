"""Building blocks shared by the GLM models: linear, RMSNorm, SwiGLU MLP.

Weights use the checkpoint's names (`weight`, `bias`) so the loader can copy them in by name. `Linear`
holds an optional per-output-channel `weight_scale` for FP8 checkpoints: on CPU the loader dequantizes
(weight_scale stays None); on GPU engine/fp8.py keeps the weight in FP8 and sets `fp8_gemm`. `RMSNorm`
has a swappable `norm_fn` (engine/kernel_selection.py puts the fused Triton kernel there on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        # FP8 hook: float8 weight, fp32 [out] scale (a buffer: the checkpoint's scales are loaded aside) and
        # `fp8_gemm(x, weight, weight_scale, bias)`. None = plain F.linear.
        self.register_buffer("weight_scale", None, persistent=False)
        self.fp8_gemm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_gemm is not None:
            return self.fp8_gemm(x, self.weight, self.weight_scale, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, the result cast back before the weight multiply (as transformers does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        # Optional fused implementation `norm_fn(x, weight, eps)` with the same semantics; None = below.
        self.norm_fn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_fn is not None:
            return self.norm_fn(x, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are stored fused as `gate_up_proj` [2I, H]."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
