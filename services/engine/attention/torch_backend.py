"""Reference attention over the paged cache in plain torch: runs anywhere, slow, easy to trust.

Each sequence's context is gathered from its block table and attended to with an explicit causal mask
(query j of a sequence with L tokens of context and q new tokens sits at position L - q + j).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmserve.engine.attention.backend import AttentionBackend, MLAWeights, store_slots
from glmserve.engine.attention.context import ForwardContext


def context_slots(block_table_row: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Flat cache slots holding tokens 0..seq_len-1 of one sequence."""
    pos = torch.arange(seq_len, device=block_table_row.device)
    return block_table_row[pos // block_size].long() * block_size + pos % block_size


def store_paged(cache: torch.Tensor, plane: int, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """Write values [T, Hkv, D] into plane 0 (K) or 1 (V) of a GQA cache [N, 2, bs, Hkv, D], in place."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    bs = cache.shape[2]
    cache[slots // bs, plane, slots % bs] = values[keep].to(cache.dtype)


def causal_mask(q_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, seq_len] bool, True where the query may attend."""
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    return k_pos <= q_pos


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def _sequences(self, ctx: ForwardContext):
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(ctx.query_lens_cpu, ctx.seq_lens_cpu)):
            slots = context_slots(ctx.block_tables[i], seq_len, ctx.block_size)
            yield slice(start, start + q_len), slots, causal_mask(q_len, seq_len, slots.device)
            start += q_len

    def gqa(self, layer, q, k, v, ctx, scale):
        cache = ctx.kv_caches[layer]  # [N, 2, bs, Hkv, D]; K and V planes are not contiguous views
        bs, hkv = cache.shape[2], cache.shape[3]
        store_paged(cache, 0, ctx.slot_mapping, k)
        store_paged(cache, 1, ctx.slot_mapping, v)
        group = q.shape[1] // hkv
        out = torch.empty_like(q)
        for rows, slots, mask in self._sequences(ctx):
            blocks, offsets = slots // bs, slots % bs
            keys = cache[blocks, 0, offsets].to(q.dtype).repeat_interleave(group, dim=1).transpose(0, 1)
            vals = cache[blocks, 1, offsets].to(q.dtype).repeat_interleave(group, dim=1).transpose(0, 1)
            o = F.scaled_dot_product_attention(q[rows].transpose(0, 1), keys, vals, attn_mask=mask, scale=scale)
            out[rows] = o.transpose(0, 1)
        ctx.layer_done(layer)
        return out

    def mla(self, layer, q_nope, q_rope, latent, k_rope, weights: MLAWeights, ctx, scale):
        cache = ctx.kv_caches[layer]  # [N, bs, R + Dr]
        n_blocks, bs, width = cache.shape
        flat = cache.view(n_blocks * bs, width)
        store_slots(flat, ctx.slot_mapping, torch.cat([latent, k_rope], dim=-1))
        rank = latent.shape[-1]
        # Absorb W_UK into the query: scores need only the latent, never the expanded keys.
        q_lat = torch.einsum("thn,hnr->thr", q_nope.float(), weights.w_uk.float())
        out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], weights.w_uv.shape[1])
        for rows, slots, mask in self._sequences(ctx):
            kv = flat[slots].float()
            c, kr = kv[:, :rank], kv[:, rank:]
            scores = (torch.einsum("qhr,kr->hqk", q_lat[rows], c)
                      + torch.einsum("qhd,kd->hqk", q_rope[rows].float(), kr)) * scale
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            o_lat = torch.einsum("hqk,kr->qhr", probs, c)
            out[rows] = torch.einsum("qhr,hvr->qhv", o_lat, weights.w_uv.float()).to(out.dtype)
        ctx.layer_done(layer)
        return out
