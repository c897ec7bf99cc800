"""MLA attention on the absorbed path, over the latent cache `[num_blocks, block_size, R + Dr]`.

Each cached token holds its normalised latent c (R values) and its RoPE'd shared key k_rope (Dr). The
caller has already folded W_UK into the query (q_latent = q_nope . W_UK), so for every head

    score = (q_latent . c + q_rope . k_rope) * scale,    out_latent = softmax(score) . c

and the caller applies W_UV afterwards. All heads share one "KV head", so a program takes BLOCK_Q query
tokens times BLOCK_H heads as the rows of one matrix product and reads each latent tile once for both
the scores and the output. Query tiles are laid out per sequence as in paged_attention.py; causal
masking, varlen chunks (decode is q_len = 1) and split-KV for small decode batches work the same way.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from glmserve.kernels.split_kv import combine_splits, default_num_splits, find_sequence, split_buffers, split_range


def mla_attention_ref(
    q_latent: torch.Tensor,  # [T, H, R]
    q_rope: torch.Tensor,  # [T, H, Dr]
    cache: torch.Tensor,  # [N, bs, R + Dr]
    query_start_loc: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
) -> torch.Tensor:  # [T, H, R]
    rank = q_latent.shape[-1]
    block_size = cache.shape[1]
    out = torch.empty_like(q_latent)
    qsl = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = qsl[b], qsl[b + 1]
        if end == start:
            continue
        pos = torch.arange(seq_len, device=cache.device)
        kv = cache[block_tables[b, pos // block_size].long(), pos % block_size].float()
        c, k_rope = kv[:, :rank], kv[:, rank:]
        scores = (torch.einsum("qhr,kr->hqk", q_latent[start:end].float(), c)
                  + torch.einsum("qhd,kd->hqk", q_rope[start:end].float(), k_rope)) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=cache.device)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,kr->qhr", scores.softmax(-1), c).to(out.dtype)
    return out


@triton.jit
def _mla_attention_kernel(
    q_lat_ptr, q_rope_ptr, cache_ptr, out_ptr, lse_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    num_seqs, num_heads, num_splits, scale_log2,
    stride_lt, stride_lh, stride_rt, stride_rh, stride_ot, stride_oh, stride_os, stride_st, stride_sh,
    stride_cb, stride_ct, stride_bt,
    RANK: tl.constexpr, ROPE: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, SPLIT: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    q_first = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if q_first >= q_len:
        return

    rows = tl.arange(0, BLOCK_Q * BLOCK_H)
    tok = q_first + rows // BLOCK_H
    head = tl.program_id(1) * BLOCK_H + rows % BLOCK_H
    row_ok = (tok < q_len) & (head < num_heads)
    q_rows = (q_start + tok).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < RANK
    dr = tl.arange(0, BLOCK_DR)
    dr_ok = dr < ROPE
    q_lat = tl.load(q_lat_ptr + q_rows[:, None] * stride_lt + head[:, None] * stride_lh + r[None, :],
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    q_rope = tl.load(q_rope_ptr + q_rows[:, None] * stride_rt + head[:, None] * stride_rh + dr[None, :],
                     mask=row_ok[:, None] & dr_ok[None, :], other=0.0)
    q_pos = seq_len - q_len + tok

    m_i = tl.full([BLOCK_Q * BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_H, BLOCK_R], tl.float32)
    kv_end = seq_len - q_len + tl.minimum(q_first + BLOCK_Q, q_len)
    if SPLIT:
        kv_start, kv_stop = split_range(kv_end, tl.program_id(2), num_splits, BLOCK_N)
    else:
        kv_start = 0
        kv_stop = kv_end
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n_start in range(kv_start, kv_stop, BLOCK_N):
        n = n_start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_stop
        page = tl.load(table + n // PAGE, mask=n_ok, other=0).to(tl.int64)
        token_ptr = cache_ptr + page * stride_cb + (n % PAGE) * stride_ct
        c = tl.load(token_ptr[:, None] + r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        k_rope = tl.load(token_ptr[:, None] + RANK + dr[None, :], mask=n_ok[:, None] & dr_ok[None, :], other=0.0)
        c = c.to(q_lat.dtype)
        s = tl.dot(q_lat, tl.trans(c), input_precision="ieee")
        s += tl.dot(q_rope, tl.trans(k_rope.to(q_rope.dtype)), input_precision="ieee")
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision="ieee")
        m_i = m_new
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    dst = out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + r[None, :]
    if SPLIT:
        dst += tl.program_id(2) * stride_os
        tl.store(lse_ptr + q_rows * stride_st + head * stride_sh + tl.program_id(2),
                 tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf")), mask=row_ok)
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


def _dot_block(dim: int) -> int:
    """A tl.dot operand's inner size: a power of two and at least 16 (the GPU's minimum; masks cover the padding)."""
    return max(16, triton.next_power_of_2(dim))


def mla_attention(
    q_latent: torch.Tensor,  # [T, H, R]
    q_rope: torch.Tensor,  # [T, H, Dr]
    cache: torch.Tensor,  # [N, bs, R + Dr]
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    num_splits: int = 1,
    block_n: int | None = None,
) -> torch.Tensor:  # [T, H, R] in q_latent's dtype
    num_tokens, num_heads, rank = q_latent.shape
    rope = q_rope.shape[-1]
    assert cache.shape[-1] == rank + rope and cache.stride(-1) == 1
    q_latent = q_latent if q_latent.stride(-1) == 1 else q_latent.contiguous()
    q_rope = q_rope if q_rope.stride(-1) == 1 else q_rope.contiguous()
    out = q_latent.new_empty(num_tokens, num_heads, rank)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    page = cache.shape[1]
    block_h = min(16, triton.next_power_of_2(num_heads))
    block_q = 1 if max_query_len == 1 else max(1, 32 // block_h)
    block_h = max(block_h, 16 // block_q)  # tl.dot wants at least 16 rows
    # The [rows, R] accumulator is large (R = 512 for GLM-4.7-Flash): keep the key tile short.
    block_n = block_n or 32
    split = num_splits > 1
    if split:
        dst, lse = split_buffers(num_tokens, num_heads, num_splits, rank, q_latent.device)
        stride_os, stride_st, stride_sh = dst.stride(2), lse.stride(0), lse.stride(1)
    else:
        dst, lse = out, out  # lse unused
        stride_os = stride_st = stride_sh = 0
    grid = (num_tokens // block_q + num_seqs, triton.cdiv(num_heads, block_h), num_splits)
    _mla_attention_kernel[grid](
        q_latent, q_rope, cache, dst, lse,
        query_start_loc, seq_lens, block_tables,
        num_seqs, num_heads, num_splits, scale * math.log2(math.e),
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        dst.stride(0), dst.stride(1), stride_os, stride_st, stride_sh,
        cache.stride(0), cache.stride(1), block_tables.stride(0),
        RANK=rank, ROPE=rope, PAGE=page,
        BLOCK_Q=block_q, BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_R=_dot_block(rank), BLOCK_DR=_dot_block(rope), SPLIT=split,
        num_warps=8 if rank >= 256 else 4,  # the [rows, R] accumulator needs the registers
    )
    if split:
        combine_splits(dst, lse, out)
    return out


def mla_attention_splits(device: torch.device, num_seqs: int, num_heads: int, max_query_len: int,
                         max_seq_len: int) -> int:
    """Split-KV for decode-only steps: B * cdiv(H, 16) programs cannot fill a GPU at small batch."""
    if max_query_len != 1:
        return 1
    return default_num_splits(device, num_seqs * triton.cdiv(num_heads, 16), max_seq_len)
