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


def padded_slots(ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots [B, Lmax] of every sequence's context, and the mask [B, Lmax] of real positions (decode steps
    batch all sequences into one attention call instead of a Python loop)."""
    lmax = max(ctx.seq_lens_cpu)
    pos = torch.arange(lmax, device=ctx.block_tables.device)
    bs = ctx.block_size
    width = ctx.block_tables.shape[1]
    blocks = ctx.block_tables[:, (pos // bs).clamp(max=width - 1)].long()
    slots = blocks * bs + pos % bs
    return slots, pos[None, :] < ctx.seq_lens[:, None].to(pos.device)


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
        if ctx.is_decode_only and ctx.num_seqs > 1:
            slots, valid = padded_slots(ctx)
            blocks, offsets = slots // bs, slots % bs
            keys = cache[blocks, 0, offsets].to(q.dtype).repeat_interleave(group, dim=2).transpose(1, 2)
            vals = cache[blocks, 1, offsets].to(q.dtype).repeat_interleave(group, dim=2).transpose(1, 2)
            o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, vals, attn_mask=valid[:, None, None, :],
                                               scale=scale)  # [B, Hq, 1, D]
            return o.squeeze(2)
        out = torch.empty_like(q)
        for rows, slots, mask in self._sequences(ctx):
            blocks, offsets = slots // bs, slots % bs
            keys = cache[blocks, 0, offsets].to(q.dtype).repeat_interleave(group, dim=1).transpose(0, 1)
            vals = cache[blocks, 1, offsets].to(q.dtype).repeat_interleave(group, dim=1).transpose(0, 1)
            o = F.scaled_dot_product_attention(q[rows].transpose(0, 1), keys, vals, attn_mask=mask, scale=scale)
            out[rows] = o.transpose(0, 1)
        return out

    def mla(self, layer, q_nope, q_rope, latent, k_rope, weights: MLAWeights, ctx, scale):
        cache = ctx.kv_caches[layer]  # [N, bs, R + Dr]
        n_blocks, bs, width = cache.shape
        flat = cache.view(n_blocks * bs, width)
        store_slots(flat, ctx.slot_mapping, torch.cat([latent, k_rope], dim=-1))
        rank = latent.shape[-1]
        # Absorb W_UK into the query: scores need only the latent, never the expanded keys.
        q_lat = torch.einsum("thn,hnr->thr", q_nope.float(), weights.w_uk.float())
        if ctx.is_decode_only and ctx.num_seqs > 1:
            slots, valid = padded_slots(ctx)
            kv = flat[slots].float()  # [B, L, R + Dr]
            c, kr = kv[..., :rank], kv[..., rank:]
            scores = (torch.einsum("bhr,blr->bhl", q_lat, c)
                      + torch.einsum("bhd,bld->bhl", q_rope.float(), kr)) * scale
            probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
            o_lat = torch.einsum("bhl,blr->bhr", probs, c)
            return torch.einsum("bhr,hvr->bhv", o_lat, weights.w_uv.float()).to(q_nope.dtype)
        out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], weights.w_uv.shape[1])
        for rows, slots, mask in self._sequences(ctx):
            kv = flat[slots].float()
            c, kr = kv[:, :rank], kv[:, rank:]
            scores = (torch.einsum("qhr,kr->hqk", q_lat[rows], c)
                      + torch.einsum("qhd,kd->hqk", q_rope[rows].float(), kr)) * scale
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            o_lat = torch.einsum("hqk,kr->qhr", probs, c)
            out[rows] = torch.einsum("qhr,hvr->qhv", o_lat, weights.w_uv.float()).to(out.dtype)
        return out
