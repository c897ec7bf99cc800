"""Rotary position embedding over the first `rotary_dim` dims of each head; the rest pass through.

Two pairings, matching the engine's models:
- NeoX (GLM-4.5 GQA, partial_rotary_factor 0.5): pairs (x_i, x_{i+half}), rotate_half style.
- interleaved (GLM-4.7-Flash MLA): pairs (x_{2i}, x_{2i+1}); like transformers (and
  `glmserve.engine.models.mla.apply_interleaved_rope`) the result is laid out [rotated evens | rotated
  odds]. q and k get the same layout, so their dot products are those of the interleaved rotation.
Either way output dim d < half is a*cos - b*sin and dim d + half is b*cos + a*sin for pair (a, b) i = d.

cos/sin are per token `[T, rotary_dim / 2]` (the engine computes them once per step for all layers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """x [T, H, D] (or [T, D]); cos/sin [T, rotary_dim/2]. Computed in fp32, cast once."""
    squeeze = x.dim() == 2
    xf = (x.unsqueeze(1) if squeeze else x).float()
    rot, rest = xf[..., :rotary_dim], xf[..., rotary_dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
    else:
        a, b = rot.chunk(2, dim=-1)
    c, s = cos.float()[:, None, :], sin.float()[:, None, :]
    out = torch.cat([a * c - b * s, b * c + a * s, rest], dim=-1).to(x.dtype)
    return out.squeeze(1) if squeeze else out


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    num_heads, head_dim,
    stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    half: tl.constexpr = ROTARY_DIM // 2
    head_ok = heads < num_heads
    rot = dims < ROTARY_DIM
    i = dims % half
    if INTERLEAVED:
        ia = 2 * i
        ib = ia + 1
    else:
        ia = i
        ib = i + half
    row = x_ptr + token * stride_xt + heads[:, None] * stride_xh
    rot_mask = head_ok[:, None] & rot[None, :]
    a = tl.load(row + ia[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    b = tl.load(row + ib[None, :], mask=rot_mask, other=0.0).to(tl.float32)
    x = tl.load(row + dims[None, :], mask=head_ok[:, None] & (dims[None, :] < head_dim) & ~rot[None, :], other=0.0)
    c = tl.load(cos_ptr + token * stride_ct + i, mask=rot, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + token * stride_st + i, mask=rot, other=0.0).to(tl.float32)[None, :]
    first = (dims < half)[None, :]
    y = tl.where(first, a * c - b * s, b * c + a * s)
    y = tl.where(rot[None, :], y, x.to(tl.float32))
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             y.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & (dims[None, :] < head_dim))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """Triton version of `rope_ref`; x may be a strided view (e.g. a split of a fused projection)."""
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(1) if squeeze else x
    num_tokens, num_heads, head_dim = x3.shape
    assert 0 < rotary_dim <= head_dim and rotary_dim % 2 == 0 and cos.shape[-1] == rotary_dim // 2
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    if num_tokens:
        block_h = min(triton.next_power_of_2(num_heads), 16)
        _rope_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
            x3, cos, sin, out,
            num_heads, head_dim,
            x3.stride(0), x3.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
            ROTARY_DIM=rotary_dim, INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return out.squeeze(1) if squeeze else out
