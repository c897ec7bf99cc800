"""Shared pieces of the paged attention kernels: the tile -> sequence lookup and split-KV combining.

Split-KV (flash-decoding): a decode step has one query per sequence, so B * Hkv programs cannot fill
a GPU when the batch is small and the contexts long. The key range of each query tile is cut into
`num_splits` pieces attended in parallel; each writes its normalised partial output and the log2-sum-
exp of its scores, and `combine_splits` merges them (weights 2^(lse_s - max lse)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The sequence b owning query tile `tile`: the largest b with qsl[b] // BLOCK_Q + b <= tile.

    Sequence b's tiles start at qsl[b] // BLOCK_Q + b, which leaves each sequence at least
    cdiv(q_len, BLOCK_Q) tiles and bounds the grid by T // BLOCK_Q + B with no host-side lengths.
    """
    lo = tl.zeros([], tl.int32)
    hi = tl.zeros([], tl.int32) + (num_seqs - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def split_range(kv_end, split, num_splits, BLOCK_N: tl.constexpr):
    """[start, end) of split `split` of the keys [0, kv_end), in whole BLOCK_N tiles."""
    tiles_per_split = tl.cdiv(tl.cdiv(kv_end, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, kv_end)
    return start, end


def combine_splits_ref(partial: torch.Tensor, lse: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """partial [T, H, S, D] fp32 (each split's normalised output), lse [T, H, S] (log2 domain, -inf for
    an empty split) -> [T, H, D]."""
    weights = torch.softmax(lse * torch.log(torch.tensor(2.0)), dim=-1)  # 2^lse normalised
    return (partial * weights.unsqueeze(-1)).sum(dim=2).to(out_dtype)


@triton.jit
def _combine_splits_kernel(
    partial_ptr, lse_ptr, out_ptr,
    num_splits, head_dim,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    d_ok = d < head_dim
    lse = tl.load(lse_ptr + token * stride_lt + head * stride_lh + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_ok, tl.exp2(lse - m), 0.0)
    parts = tl.load(partial_ptr + token * stride_pt + head * stride_ph + s[:, None] * stride_ps + d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def combine_splits(partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Triton version of `combine_splits_ref`, writing into out [T, H, D]."""
    num_tokens, num_heads, num_splits, head_dim = partial.shape
    if num_tokens:
        _combine_splits_kernel[(num_tokens, num_heads)](
            partial, lse, out, num_splits, head_dim,
            partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return out


def split_buffers(num_tokens: int, num_heads: int, num_splits: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    partial = torch.empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=device)
    return partial, lse


_SM_COUNT: dict[int, int] = {}


def default_num_splits(device: torch.device, programs: int, max_kv_len: int, min_keys_per_split: int = 256) -> int:
    """Splits so that about two programs per SM run, never splitting under `min_keys_per_split` keys.
    One split off CUDA (the interpreter gains nothing from splitting)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    want = -(-2 * _SM_COUNT[index] // max(programs, 1))
    return max(1, min(want, max_kv_len // min_keys_per_split, 64))
