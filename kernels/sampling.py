"""Top-k / top-p filtering of logits without sorting the vocabulary.

Per row, keep the k largest logits, then of those the smallest set of most likely tokens whose
probability (renormalised over the top k) reaches top_p; everything else becomes -inf. top_k <= 0 or
>= V and top_p >= 1 switch a filter off.

Sorting 150k logits per row is the expensive part of doing this in torch. The kernel instead finds
each cut-off value by bisection over the 32-bit ordered integer image of the fp32 logits: 32 steps,
each a streaming pass over the row (which stays in L2), end exactly on a logit value. Logits tied
with the cut-off value are all kept (a sort would break the tie arbitrarily).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def top_k_top_p_filter_ref(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; top_k [B] int; top_p [B] float. Sort-based reference."""
    vocab = logits.shape[-1]
    values, order = logits.float().sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = top_k.to(logits.device).long()
    k = torch.where((k <= 0) | (k > vocab), vocab, k)
    keep = rank < k[:, None]
    probs = values.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    p = top_p.to(logits.device).float()[:, None]
    keep &= (mass_before < p) | (p >= 1.0)
    keep[:, 0] = True
    mask = torch.zeros_like(keep).scatter_(1, order, keep)
    return logits.masked_fill(~mask, float("-inf"))


@triton.jit
def _ordered_key(x):
    """fp32 -> int32 with the same order (flip the magnitude bits of negative numbers)."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _top_k_top_p_kernel(
    logits_ptr, out_ptr, top_k_ptr, top_p_ptr,
    vocab, stride_l, stride_o,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    src = logits_ptr + row * stride_l
    k = tl.load(top_k_ptr + row).to(tl.int64)
    p = tl.load(top_p_ptr + row).to(tl.float32)

    # Pass 1: row maximum (for the softmax) and the key range.
    m = tl.full([], float("-inf"), tl.float32)
    key_lo = tl.full([], 2**31 - 1, tl.int64)
    key_hi = tl.full([], -(2**31), tl.int64)
    for off in range(0, vocab, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        ok = cols < vocab
        x = tl.load(src + cols, mask=ok, other=float("-inf")).to(tl.float32)
        key = _ordered_key(x)
        m = tl.maximum(m, tl.max(x, 0))
        key_lo = tl.minimum(key_lo, tl.min(tl.where(ok, key, 2**31 - 1), 0))
        key_hi = tl.maximum(key_hi, tl.max(tl.where(ok, key, -(2**31)), 0))

    # Top-k: the largest key t with count(key >= t) >= k. Invariant: f(lo) true, f(hi) false.
    lo = key_lo
    hi = key_hi + 1
    if (k > 0) & (k < vocab):
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            count = tl.zeros([], tl.int64)
            for off in range(0, vocab, BLOCK_V):
                cols = off + tl.arange(0, BLOCK_V)
                ok = cols < vocab
                x = tl.load(src + cols, mask=ok, other=float("-inf")).to(tl.float32)
                count += tl.sum((ok & (_ordered_key(x) >= mid)).to(tl.int64), 0)
            enough = count >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
    k_cut = lo

    # Top-p over the survivors: the largest key t whose tokens (key >= t) carry mass >= p.
    lo = k_cut
    hi = key_hi + 1
    if p < 1.0:
        total = tl.zeros([], tl.float32)
        for off in range(0, vocab, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            ok = cols < vocab
            x = tl.load(src + cols, mask=ok, other=float("-inf")).to(tl.float32)
            total += tl.sum(tl.where(ok & (_ordered_key(x) >= k_cut), tl.exp(x - m), 0.0), 0)
        target = p * total
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            mass = tl.zeros([], tl.float32)
            for off in range(0, vocab, BLOCK_V):
                cols = off + tl.arange(0, BLOCK_V)
                ok = cols < vocab
                x = tl.load(src + cols, mask=ok, other=float("-inf")).to(tl.float32)
                mass += tl.sum(tl.where(ok & (_ordered_key(x) >= mid), tl.exp(x - m), 0.0), 0)
            enough = mass >= target
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
    cut = lo

    dst = out_ptr + row * stride_o
    for off in range(0, vocab, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        ok = cols < vocab
        x = tl.load(src + cols, mask=ok, other=0.0)
        keep = _ordered_key(x.to(tl.float32)) >= cut
        tl.store(dst + cols, tl.where(keep, x, float("-inf")).to(out_ptr.dtype.element_ty), mask=ok)


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       block_v: int = 4096) -> torch.Tensor:
    """Triton version of `top_k_top_p_filter_ref` (returns a new tensor, logits untouched)."""
    batch, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty_like(logits)
    if batch:
        _top_k_top_p_kernel[(batch,)](
            logits, out, top_k.to(logits.device, torch.int64), top_p.to(logits.device, torch.float32),
            vocab, logits.stride(0), out.stride(0),
            BLOCK_V=min(block_v, triton.next_power_of_2(vocab)),
        )
    return out
