"""The torch attention backend's batched paths against a naive per-sequence, per-head computation:
decode rows interleaved with prefill chunks (gathered and scattered back), uneven context lengths
(padding masked), a padded token with slot -1 (not stored), GQA and MLA. Transformers parity
(test_glm4_moe*_parity.py) checks the same backend through whole models."""

import torch

from glmserve.engine.attention.backend import MLAWeights
from glmserve.engine.attention.context import SeqChunk, build_context
from glmserve.engine.attention.torch_backend import TorchAttentionBackend

BS = 4
# (blocks, cached tokens, new tokens): decode, chunk over a cached prefix, decode, fresh prefill.
SEQS = [([3, 9, 1], 9, 1), ([5, 0, 6], 4, 6), ([7], 2, 1), ([2, 8], 0, 5)]


def _step(caches):
    ctx = build_context([SeqChunk(b, c, n) for b, c, n in SEQS], BS, caches, torch.device("cpu"))
    # One padding token at the end (as CUDA-graph batches have): slot -1, its output is ignored.
    ctx.slot_mapping = torch.cat([ctx.slot_mapping, torch.tensor([-1])])
    ctx.query_lens_cpu = ctx.query_lens_cpu + [0]
    ctx.seq_lens_cpu = ctx.seq_lens_cpu + [0]
    ctx.block_tables = torch.cat([ctx.block_tables, torch.zeros(1, ctx.block_tables.shape[1], dtype=torch.int32)])
    return ctx


def _context_rows(blocks, n):
    return [(blocks[p // BS], p % BS) for p in range(n)]


def test_gqa_matches_naive_attention():
    g = torch.Generator().manual_seed(0)
    hq, hkv, d = 6, 2, 8
    caches = [torch.randn(10, 2, BS, hkv, d, generator=g)]
    before = caches[0].clone()
    t = sum(n for _, _, n in SEQS) + 1
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    out = TorchAttentionBackend().gqa(0, q, k, v, _step(caches), 0.3)
    row = 0
    for blocks, cached, new in SEQS:
        for j in range(new):
            b, o = blocks[(cached + j) // BS], (cached + j) % BS
            before[b, 0, o], before[b, 1, o] = k[row + j], v[row + j]
        for j in range(new):
            ctx_rows = _context_rows(blocks, cached + j + 1)  # causal: up to and including itself
            keys = torch.stack([before[b, 0, o] for b, o in ctx_rows])  # [L, Hkv, D]
            vals = torch.stack([before[b, 1, o] for b, o in ctx_rows])
            for h in range(hq):
                kv_head = h // (hq // hkv)
                p = (keys[:, kv_head] @ q[row + j, h] * 0.3).softmax(0)
                torch.testing.assert_close(out[row + j, h], p @ vals[:, kv_head], atol=1e-5, rtol=1e-5)
        row += new
    torch.testing.assert_close(caches[0], before, atol=0, rtol=0)  # stored, and slot -1 wrote nothing


def test_mla_matches_naive_attention():
    g = torch.Generator().manual_seed(1)
    h, nope, rope, rank, vdim = 3, 8, 4, 16, 6
    caches = [torch.randn(10, BS, rank + rope, generator=g)]
    before = caches[0].clone()
    t = sum(n for _, _, n in SEQS) + 1
    q_nope, q_rope = torch.randn(t, h, nope, generator=g), torch.randn(t, h, rope, generator=g)
    latent, k_rope = torch.randn(t, rank, generator=g), torch.randn(t, rope, generator=g)
    w = MLAWeights(w_uk=torch.randn(h, nope, rank, generator=g), w_uv=torch.randn(h, vdim, rank, generator=g))
    out = TorchAttentionBackend().mla(0, q_nope, q_rope, latent, k_rope, w, _step(caches), 0.2)
    row = 0
    for blocks, cached, new in SEQS:
        for j in range(new):
            b, o = blocks[(cached + j) // BS], (cached + j) % BS
            before[b, o] = torch.cat([latent[row + j], k_rope[row + j]])
        for j in range(new):
            ctx = torch.stack([before[b, o] for b, o in _context_rows(blocks, cached + j + 1)])
            c, kr = ctx[:, :rank], ctx[:, rank:]
            for head in range(h):
                keys = c @ w.w_uk[head].T  # expanded keys [L, nope]: what absorption must equal
                scores = (keys @ q_nope[row + j, head] + kr @ q_rope[row + j, head]) * 0.2
                expected = scores.softmax(0) @ (c @ w.w_uv[head].T)
                torch.testing.assert_close(out[row + j, head], expected, atol=1e-4, rtol=1e-4)
        row += new
    torch.testing.assert_close(caches[0], before, atol=0, rtol=0)
