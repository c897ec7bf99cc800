"""Write new tokens' KV rows into a paged cache (the "reshape and cache" step of every attention layer).

The cache view is `[num_blocks, block_size, width]` with a contiguous last dimension and any block and
token strides, so one kernel serves both layouts: a GQA plane `cache[:, 0].flatten(2)` (K or V, width
Hkv*D) and the MLA latent/rope slices `cache[..., :R]`, `cache[..., R:]`. Slot -1 means padding: skip.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def store_paged_ref(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """cache[slot // bs, slot % bs] = values[t] for every t with slot_mapping[t] >= 0."""
    block_size = cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    cache[slots // block_size, slots % block_size] = values[keep].to(cache.dtype)


@triton.jit
def _store_paged_kernel(
    values_ptr, stride_vt,
    cache_ptr, stride_cb, stride_ct,
    slot_ptr, width,
    BLOCK_SIZE: tl.constexpr, BLOCK_W: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    ok = cols < width
    x = tl.load(values_ptr + token.to(tl.int64) * stride_vt + cols, mask=ok)
    dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + cols
    tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=ok)


def store_paged(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """Triton version of `store_paged_ref`; no host sync (padding slots are skipped on the device)."""
    num_tokens, width = values.shape
    if num_tokens == 0:
        return
    assert cache.dim() == 3 and cache.shape[2] == width and cache.stride(2) == 1, "cache view must be [N, bs, W]"
    if values.stride(1) != 1:
        values = values.contiguous()
    block_w = min(triton.next_power_of_2(width), 1024)
    grid = (num_tokens, triton.cdiv(width, block_w))
    _store_paged_kernel[grid](
        values, values.stride(0),
        cache, cache.stride(0), cache.stride(1),
        slot_mapping.to(torch.int64), width,
        BLOCK_SIZE=cache.shape[1], BLOCK_W=block_w,
    )
