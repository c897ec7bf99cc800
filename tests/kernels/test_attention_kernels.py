"""Paged GQA attention, MLA attention and the KV store kernels against their torch references."""

import math

import pytest
import torch

from glmserve.kernels.kv_store import store_paged, store_paged_ref
from glmserve.kernels.mla_attention import mla_attention, mla_attention_ref
from glmserve.kernels.paged_attention import paged_attention, paged_attention_ref
from glmserve.kernels.split_kv import combine_splits, combine_splits_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(cached_and_new, block_size, num_blocks, seed=0):
    """Block tables (shuffled blocks), query_start_loc and seq_lens for (num_cached, num_new) pairs."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, qsl, seq_lens = [], [0], []
    for cached, new in cached_and_new:
        n = -(-(cached + new) // block_size)
        tables.append([perm.pop() for _ in range(n)])
        qsl.append(qsl[-1] + new)
        seq_lens.append(cached + new)
    width = max(len(t) for t in tables)
    table = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return table.to(DEVICE), torch.tensor(qsl, **i32), torch.tensor(seq_lens, **i32)


# Mixed steps: prefill chunks over cached prefixes, fresh prompts, decode rows.
MIXED = [(5, 7), (0, 9), (13, 1), (3, 40), (0, 1), (30, 3)]
DECODE = [(6, 1), (0, 1), (21, 1)]


SPLITS = [1, 3]  # 3 splits: some empty for short sequences, uneven for long ones


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("num_splits", SPLITS)
def test_paged_attention_matches_reference(dtype, tol, seqs, num_splits):
    torch.manual_seed(0)
    bs, hq, hkv, d = 4, 6, 2, 24  # group 3 and head_dim 24 exercise the padding masks
    num_blocks = 32
    table, qsl, seq_lens = make_batch(seqs, bs, num_blocks)
    cache = torch.randn(num_blocks, 2, bs, hkv, d, dtype=dtype, device=DEVICE)
    q = torch.randn(int(qsl[-1]), hq, d, dtype=dtype, device=DEVICE)
    scale = 1 / math.sqrt(d)
    ref = paged_attention_ref(q, cache, qsl, seq_lens, table, scale)
    out = paged_attention(q, cache, qsl, seq_lens, table, scale, max_query_len=max(n for _, n in seqs),
                          num_splits=num_splits)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("num_splits", SPLITS)
def test_mla_attention_matches_reference(dtype, tol, seqs, num_splits):
    torch.manual_seed(1)
    bs, heads, rank, rope = 4, 5, 48, 16
    num_blocks = 32
    table, qsl, seq_lens = make_batch(seqs, bs, num_blocks, seed=1)
    cache = torch.randn(num_blocks, bs, rank + rope, dtype=dtype, device=DEVICE)
    t = int(qsl[-1])
    q_lat = torch.randn(t, heads, rank, dtype=dtype, device=DEVICE) / 4
    q_rope = torch.randn(t, heads, rope, dtype=dtype, device=DEVICE)
    scale = 1 / math.sqrt(rank + rope)
    ref = mla_attention_ref(q_lat, q_rope, cache, qsl, seq_lens, table, scale)
    out = mla_attention(q_lat, q_rope, cache, qsl, seq_lens, table, scale, max_query_len=max(n for _, n in seqs),
                        num_splits=num_splits)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_paged_skips_padding_and_respects_strides(dtype):
    torch.manual_seed(2)
    cache = torch.zeros(6, 2, 4, 3, 8, dtype=dtype, device=DEVICE)
    slots = torch.tensor([5, -1, 0, 23, 9], dtype=torch.int64, device=DEVICE)
    k = torch.randn(5, 3, 8, dtype=dtype, device=DEVICE)
    expected = cache.clone()
    store_paged_ref(expected[:, 1].flatten(2), slots, k.flatten(1))
    store_paged(cache[:, 1].flatten(2), slots, k.flatten(1))
    torch.testing.assert_close(cache, expected, atol=0, rtol=0)
    assert cache[:, 0].abs().sum() == 0  # the K plane was not touched
    # MLA: latent and rope slices of one [N, bs, R + Dr] cache.
    mla = torch.zeros(6, 4, 20, dtype=dtype, device=DEVICE)
    latent, rope = torch.randn(5, 16, dtype=dtype, device=DEVICE), torch.randn(5, 4, dtype=dtype, device=DEVICE)
    store_paged(mla[..., :16], slots, latent)
    store_paged(mla[..., 16:], slots, rope)
    keep = slots >= 0
    flat = mla.view(24, 20)[slots[keep]]
    torch.testing.assert_close(flat, torch.cat([latent, rope], -1)[keep], atol=0, rtol=0)


def test_combine_splits_weights_by_log2_sum_exp():
    torch.manual_seed(3)
    partial = torch.randn(3, 2, 4, 8, device=DEVICE)
    lse = torch.randn(3, 2, 4, device=DEVICE) * 3
    lse[0, 0, 1:] = float("-inf")  # empty splits carry no weight
    out = combine_splits(partial, lse, torch.empty(3, 2, 8, device=DEVICE))
    torch.testing.assert_close(out, combine_splits_ref(partial, lse, torch.float32))
    torch.testing.assert_close(out[0, 0], partial[0, 0, 0])
