"""Fused residual add + RMSNorm, one row per program.

Semantics follow the engine's `RMSNorm` (glmserve.engine.models.layers): the sum x + residual is
rounded to the activation dtype (it is the next residual), normalised in fp32, cast back, then
multiplied by the weight. Without a residual it is a plain RMSNorm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rmsnorm_residual_ref(
    x: torch.Tensor,  # [T, H]
    residual: torch.Tensor | None,  # [T, H] or None
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) where new_residual = x + residual (or x when residual is None)."""
    summed = x if residual is None else x + residual
    xf = summed.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, summed


@triton.jit
def _rmsnorm_residual_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    hidden_size, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded like torch's add
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, 0) / hidden_size + eps)
    normed = (xf * inv_rms).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def rmsnorm_residual(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rmsnorm_residual_ref`: one read of x and residual, one write of each output."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, hidden_size = x2.shape
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(rows, hidden_size, dtype=out_dtype, device=x.device)
    if residual is None:
        res2, res_out = x2, x  # the new residual is x itself: nothing to write
    else:
        res2 = residual.reshape(-1, hidden_size)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        res_out = torch.empty_like(x2)
    if rows:
        block = triton.next_power_of_2(hidden_size)
        _rmsnorm_residual_kernel[(rows,)](
            x2, res2, weight, out, res_out if residual is not None else out,
            hidden_size, eps,
            x2.stride(0), res2.stride(0), out.stride(0), res_out.stride(0) if residual is not None else 0,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=4 if block <= 1024 else (8 if block <= 4096 else 16),  # one row per program
        )
    return out.view(shape), res_out.view(shape)
