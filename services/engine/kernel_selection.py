"""Which implementation each swappable model hook gets on a device.

The models expose two hooks and never branch on the device: `MoE.experts_fn` (experts) and
`RMSNorm.norm_fn` (normalisation). On CUDA with Triton installed they get the Triton kernels in
kernels/ (fused MoE: tokens sorted by expert + grouped GEMMs; fused RMSNorm); everywhere else the torch
references stay. FP8 experts (engine/fp8.py) are left as they are. Attention goes through the attention
backends (attention/registry.py), not through here.

The kernel modules are imported only when a Triton choice is applied, never at import time (Triton's
interpreter, for CPU tests, must be switched on before they are imported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glmserve.engine.attention.capability import triton_installed
from glmserve.engine.models.layers import RMSNorm
from glmserve.engine.models.moe import MoE, experts_reference

TORCH = "torch"
TRITON = "triton"


@dataclass(frozen=True)
class KernelChoice:
    moe: str = TORCH  # experts: torch | triton
    rmsnorm: str = TORCH  # torch | triton


def choose_kernels(device: torch.device, triton_available: bool | None = None) -> KernelChoice:
    """Triton kernels on CUDA when Triton is installed, the torch references anywhere else."""
    if triton_available is None:
        triton_available = triton_installed()
    if torch.device(device).type == "cuda" and triton_available:
        return KernelChoice(moe=TRITON, rmsnorm=TRITON)
    return KernelChoice()


def _triton_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from glmserve.kernels.rmsnorm import rmsnorm_residual

    return rmsnorm_residual(x, None, weight, eps)[0]


def _selectable_experts(fn) -> bool:
    """The torch reference or the bf16 fused kernel (compared by name: no kernel import needed)."""
    return fn is experts_reference or (getattr(fn, "__module__", None) == "glmserve.kernels.fused_moe"
                                       and getattr(fn, "__name__", None) == "fused_moe")


def apply_kernels(model: nn.Module, choice: KernelChoice) -> dict[str, int]:
    """Set the hooks of every MoE and RMSNorm in `model`; returns how many of each were switched to Triton.
    Hooks set to anything else (FP8 experts, a test's own function) are left alone."""
    counts = {"moe": 0, "rmsnorm": 0}
    if choice.moe == TRITON:
        from glmserve.kernels.fused_moe import fused_moe
    for module in model.modules():
        if isinstance(module, MoE) and _selectable_experts(module.experts_fn):
            module.experts_fn = fused_moe if choice.moe == TRITON else experts_reference
            counts["moe"] += choice.moe == TRITON
        elif isinstance(module, RMSNorm) and module.norm_fn in (None, _triton_rmsnorm):
            module.norm_fn = _triton_rmsnorm if choice.rmsnorm == TRITON else None
            counts["rmsnorm"] += choice.rmsnorm == TRITON
    return counts


def select_kernels(model: nn.Module, device: torch.device) -> KernelChoice:
    """choose_kernels + apply_kernels: what the model runner calls once after loading."""
    choice = choose_kernels(device)
    apply_kernels(model, choice)
    return choice
