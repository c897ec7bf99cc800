"""Attention through glmserve's own Triton kernels: the portable GPU fallback (any CUDA GPU Triton
supports) and, under TRITON_INTERPRET=1, a CPU-testable twin of the GPU path.

One kernel handles a whole mixed step (prefill chunks over cached prefixes and decode rows), so no
per-step planning is needed. The kernel modules are imported on first use, never at
`import glmserve.engine` (TRITON_INTERPRET must be set before they are).
"""

from __future__ import annotations

import torch

from glmserve.engine.attention.backend import AttentionBackend, MLAWeights
from glmserve.engine.attention.context import ForwardContext


def store_kv_gqa(cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k/v [T, Hkv, D] into a `[N, 2, bs, Hkv, D]` layer cache (slot -1 skipped, no host sync)."""
    from glmserve.kernels.kv_store import store_paged

    t = k.shape[0]
    store_paged(cache[:, 0].flatten(2), slot_mapping, k.reshape(t, -1))
    store_paged(cache[:, 1].flatten(2), slot_mapping, v.reshape(t, -1))


def store_kv_mla(cache: torch.Tensor, slot_mapping: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
    """Write [latent | k_rope] into a `[N, bs, R + Dr]` layer cache."""
    from glmserve.kernels.kv_store import store_paged

    rank = latent.shape[-1]
    store_paged(cache[..., :rank], slot_mapping, latent)
    store_paged(cache[..., rank:], slot_mapping, k_rope)


def absorb_query(q_nope: torch.Tensor, weights: MLAWeights) -> torch.Tensor:
    """q_latent [T, H, R] = q_nope [T, H, nope] . W_UK [H, nope, R], one batched GEMM over heads."""
    return torch.bmm(q_nope.transpose(0, 1), weights.w_uk.to(q_nope.dtype)).transpose(0, 1)


def expand_output(o_latent: torch.Tensor, weights: MLAWeights) -> torch.Tensor:
    """out [T, H, v] = o_latent [T, H, R] . W_UV^T [H, R, v]."""
    w_uv = weights.w_uv.to(o_latent.dtype)
    return torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    # The kernels read lengths and tables from the device and sync nothing; host lengths only pick splits.
    supports_cuda_graphs = True

    def __init__(self, num_splits: int | None = None):
        # None: split-KV chosen per step from the device and the batch (decode only); tests force it.
        self.num_splits = num_splits

    def gqa(self, layer, q, k, v, ctx: ForwardContext, scale):
        from glmserve.kernels.paged_attention import paged_attention, paged_attention_splits

        cache = ctx.kv_caches[layer]
        store_kv_gqa(cache, ctx.slot_mapping, k, v)
        max_q = max(ctx.query_lens_cpu, default=1)
        splits = self.num_splits or paged_attention_splits(
            q.device, ctx.num_seqs, cache.shape[3], max_q, max(ctx.seq_lens_cpu, default=1))
        out = paged_attention(q, cache, ctx.query_start_loc, ctx.seq_lens, ctx.block_tables, scale,
                              max_query_len=max_q, num_splits=splits)
        return out

    def mla(self, layer, q_nope, q_rope, latent, k_rope, weights: MLAWeights, ctx: ForwardContext, scale):
        from glmserve.kernels.mla_attention import mla_attention, mla_attention_splits

        cache = ctx.kv_caches[layer]
        store_kv_mla(cache, ctx.slot_mapping, latent, k_rope)
        max_q = max(ctx.query_lens_cpu, default=1)
        splits = self.num_splits or mla_attention_splits(
            q_nope.device, ctx.num_seqs, q_nope.shape[1], max_q, max(ctx.seq_lens_cpu, default=1))
        o_latent = mla_attention(absorb_query(q_nope, weights), q_rope, cache, ctx.query_start_loc,
                                 ctx.seq_lens, ctx.block_tables, scale, max_query_len=max_q, num_splits=splits)
        return expand_output(o_latent, weights)
