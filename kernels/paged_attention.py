"""Causal GQA attention over a paged KV cache, for varlen query chunks (decode is q_len = 1).

Cache layout `[num_blocks, 2, block_size, Hkv, D]` (index 0 = K, 1 = V). Sequence b owns queries
`query_start_loc[b]:query_start_loc[b+1]`; after this step it holds `seq_lens[b]` tokens of KV (the new
ones already written), so query j of a chunk of q_len sits at position seq_len - q_len + j.

The kernel tiles the flat query rows: a program takes BLOCK_Q query tokens of one sequence times all
the query heads sharing one KV head, so each K/V tile loaded from the cache feeds the whole group (a
decode step of GLM-4.5, 12 query heads per KV head, becomes a 16-row matrix product). Programs are laid
out as `query_start_loc[b] // BLOCK_Q + b` tiles per sequence, which bounds the grid by T/BLOCK_Q + B
without knowing the per-sequence lengths on the host; the few surplus programs exit at once.
Dots use input_precision="ieee": it only matters for fp32 inputs (exact instead of TF32, for tests);
bf16/fp16 always run on tensor cores. With `num_splits` > 1 each tile's keys are also split across programs (flash-decoding, split_kv.py),
which is what keeps a GPU busy on small decode batches with long contexts.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from glmserve.kernels.split_kv import combine_splits, default_num_splits, find_sequence, split_buffers, split_range


def paged_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [N, 2, bs, Hkv, D]
    query_start_loc: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
) -> torch.Tensor:
    """Gather each sequence's K/V through its block table and attend with an explicit causal mask."""
    block_size, hkv = kv_cache.shape[2], kv_cache.shape[3]
    group = q.shape[1] // hkv
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = qsl[b], qsl[b + 1]
        if end == start:
            continue
        pos = torch.arange(seq_len, device=q.device)
        blocks = block_tables[b, pos // block_size].long()
        k = kv_cache[blocks, 0, pos % block_size].float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = kv_cache[blocks, 1, pos % block_size].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    num_seqs, num_splits, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
    stride_cb, stride_ct, stride_ch, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """SPLIT: out is the fp32 partial buffer [T, Hq, S, D] and lse [T, Hq, S] gets each split's
    log2-sum-exp; otherwise out is the final [T, Hq, D]."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    q_first = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first query of this tile, within the chunk
    if q_first >= q_len:
        return

    # Rows are (query token, head of the group) pairs, token-major.
    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    tok = q_first + rows // BLOCK_G
    head = kv_head * GROUP + rows % BLOCK_G
    row_ok = (tok < q_len) & (rows % BLOCK_G < GROUP)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q_pos = seq_len - q_len + tok  # absolute position of each row's query

    m_i = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    # Keys beyond the tile's last query can never be attended: stop there.
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
        offs = page * stride_cb + (n % PAGE) * stride_ct + kv_head * stride_ch
        kv_mask = n_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale_log2
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows see no key at all
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
        m_i = m_new
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    dst = out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    if SPLIT:
        dst += tl.program_id(2) * stride_os
        tl.store(lse_ptr + q_rows * stride_lt + head * stride_lh + tl.program_id(2),
                 tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf")), mask=row_ok)
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [N, 2, bs, Hkv, D]
    query_start_loc: torch.Tensor,  # [B+1] int32, on q's device
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    max_query_len: int | None = None,
    num_splits: int = 1,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `paged_attention_ref`. `max_query_len` (known on the host) picks the tile
    shape: decode-only steps use one query token per tile, prefill chunks several. `num_splits` > 1
    splits every tile's keys across programs (see `paged_attention_splits` for a default)."""
    num_tokens, num_heads, head_dim = q.shape
    _, two, page, hkv, d_cache = kv_cache.shape
    assert two == 2 and d_cache == head_dim and num_heads % hkv == 0 and kv_cache.stride(-1) == 1
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // hkv
    block_g = triton.next_power_of_2(group)
    if max_query_len is None or max_query_len > 1:
        block_q = max(1, 64 // block_g)
    else:
        block_q = 1
    block_g = max(block_g, 16 // block_q)  # tl.dot wants at least 16 rows
    block_n = block_n or max(16, min(64, triton.next_power_of_2(page)))
    k_cache, v_cache = kv_cache[:, 0], kv_cache[:, 1]
    split = num_splits > 1
    if split:
        dst, lse = split_buffers(num_tokens, num_heads, num_splits, head_dim, q.device)
        stride_os, stride_lt, stride_lh = dst.stride(2), lse.stride(0), lse.stride(1)
    else:
        dst, lse = out, out  # lse unused
        stride_os = stride_lt = stride_lh = 0
    grid = (num_tokens // block_q + num_seqs, hkv, num_splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, dst, lse,
        query_start_loc, seq_lens, block_tables,
        num_seqs, num_splits, scale * math.log2(math.e),
        q.stride(0), q.stride(1), dst.stride(0), dst.stride(1), stride_os, stride_lt, stride_lh,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # tl.dot: K >= 16
        SPLIT=split,
    )
    if split:
        combine_splits(dst, lse, out)
    return out


def paged_attention_splits(device: torch.device, num_seqs: int, num_kv_heads: int, max_query_len: int,
                           max_seq_len: int) -> int:
    """Split-KV for decode-only steps whose B * Hkv programs would leave SMs idle; prefill has enough
    query tiles already."""
    if max_query_len != 1:
        return 1
    return default_num_splits(device, num_seqs * num_kv_heads, max_seq_len)
