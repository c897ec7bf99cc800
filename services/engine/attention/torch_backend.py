"""Reference attention over the paged cache in plain torch: runs anywhere, easy to trust, and quick
enough on CPU that serving the tiny model is not dominated by it.

Each step is planned once (`TorchStepPlan`, shared by every layer): the cache blocks each sequence
reads, the slots the new tokens write, and additive masks (0 = attend, -inf = not). Then per layer:
- one `index_copy_` stores the new K/V (or MLA latent) rows;
- all single-query sequences (decode rows) attend in one batched call over their contexts padded to
  the longest, gathering whole blocks from the cache with one `index_select` (a block is contiguous
  in both cache layouts, so this copies large rows rather than one token at a time);
- each multi-token chunk (prefill) attends on its own with a causal mask (query j of a sequence with
  L tokens of context and q new ones sits at position L - q + j).
GQA never copies K/V per query head: the query heads sharing a KV head are laid out as one matrix
and multiplied against that head's keys. Arithmetic is fp32 whatever the cache dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.engine.attention.backend import AttentionBackend, MLAWeights
from glmserve.engine.attention.context import ForwardContext

_STATE_KEY = "torch"


def _mask_bias(allowed: torch.Tensor) -> torch.Tensor:
    """0 where allowed, -inf elsewhere: added to scores before softmax (same result as masked_fill)."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@dataclass
class _Chunk:
    """One multi-token sequence of the step: its query rows, its blocks [nb], causal bias [q, nb * bs]."""

    rows: slice
    blocks: torch.Tensor
    bias: torch.Tensor


@dataclass
class TorchStepPlan:
    """Everything about a step's attention that does not depend on the layer."""

    store_slots: torch.Tensor  # [T'] slots of the new tokens that are stored (slot -1 dropped)
    store_keep: torch.Tensor | None  # [T] bool, None when every new token is stored
    gqa_store_rows: torch.Tensor  # [2 T'] rows of K then V for those slots in a GQA cache seen as [-1, Hkv, D]
    chunks: list[_Chunk]
    decode_rows: torch.Tensor | None = None  # [B] query row of each single-query sequence; None if none
    decode_all: bool = False  # every token of the step is a decode row, in order (no gather/scatter)
    decode_blocks: torch.Tensor | None = None  # [B, nb] blocks of each decode row's context, padded
    decode_bias: torch.Tensor | None = None  # [B, nb * bs] 0 / -inf

    @classmethod
    def build(cls, ctx: ForwardContext) -> "TorchStepPlan":
        bs = ctx.block_size
        device = ctx.block_tables.device
        tables = ctx.block_tables.long()
        keep = ctx.slot_mapping >= 0
        all_kept = bool(keep.all())
        decode_idx, decode_rows, chunks, start = [], [], [], 0
        for i, (q_len, seq_len) in enumerate(zip(ctx.query_lens_cpu, ctx.seq_lens_cpu)):
            if q_len == 1:
                decode_idx.append(i)
                decode_rows.append(start)
            elif q_len > 1:
                nb = -(-seq_len // bs)
                k_pos = torch.arange(nb * bs, device=device)[None, :]
                q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
                chunks.append(_Chunk(slice(start, start + q_len), tables[i, :nb], _mask_bias(k_pos <= q_pos)))
            start += q_len
        slots = ctx.slot_mapping if all_kept else ctx.slot_mapping[keep]
        k_rows = (slots // bs) * (2 * bs) + slots % bs  # a GQA block holds bs K rows, then bs V rows
        plan = cls(slots, None if all_kept else keep, torch.cat([k_rows, k_rows + bs]), chunks)
        if decode_idx:
            lens = [ctx.seq_lens_cpu[i] for i in decode_idx]
            nb = -(-max(lens) // bs)
            idx = torch.tensor(decode_idx, dtype=torch.long, device=device)
            plan.decode_blocks = tables[idx, :nb]
            k_pos = torch.arange(nb * bs, device=device)[None, :]
            plan.decode_bias = _mask_bias(k_pos < torch.tensor(lens, device=device)[:, None])
            plan.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
            plan.decode_all = len(decode_rows) == start
        return plan


def step_plan(ctx: ForwardContext) -> TorchStepPlan:
    """The step's plan: made by prepare(), or here on first use when a caller skipped prepare()."""
    plan = ctx.backend_state.get(_STATE_KEY)
    if plan is None:
        plan = ctx.backend_state[_STATE_KEY] = TorchStepPlan.build(ctx)
    return plan


def _gqa_kv(cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of `blocks` [..., nb] from a GQA cache [N, 2, bs, Hkv, D], each [..., Hkv, nb * bs, D] fp32."""
    _, _, bs, hkv, d = cache.shape
    g = cache.index_select(0, blocks.flatten()).float().view(*blocks.shape, 2, bs, hkv, d)
    lead = blocks.dim() - 1  # batch dims before nb
    # [..., nb, 2, bs, Hkv, D] -> [2, ..., Hkv, nb, bs, D] -> [2, ..., Hkv, nb * bs, D] (one copy)
    perm = (lead + 1, *range(lead), lead + 3, lead, lead + 2, lead + 4)
    kv = g.permute(*perm).reshape(2, *blocks.shape[:-1], hkv, blocks.shape[-1] * bs, d)
    return kv[0], kv[1]


def _attend_grouped(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, bias: torch.Tensor,
                    scale: float, group: int) -> torch.Tensor:
    """q [..., Hkv, G * Q, D] (the G query heads of each KV head, Q queries each) against keys / vals
    [..., Hkv, L, D], with bias broadcastable to [..., Hkv, G, Q, L]; returns [..., Hkv, G * Q, D].
    Plain batched matmuls: no K/V copy per query head."""
    scores = torch.matmul(q, keys.transpose(-1, -2))
    grouped = scores.view(*scores.shape[:-2], group, -1, scores.shape[-1])
    grouped.mul_(scale).add_(bias)
    return torch.matmul(scores.softmax(dim=-1), vals)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def prepare(self, ctx: ForwardContext) -> None:
        ctx.backend_state[_STATE_KEY] = TorchStepPlan.build(ctx)

    def gqa(self, layer, q, k, v, ctx, scale):
        plan = step_plan(ctx)
        cache = ctx.kv_caches[layer]  # [N, 2, bs, Hkv, D]
        _, _, bs, hkv, d = cache.shape
        if plan.store_keep is not None:
            k, v = k[plan.store_keep], v[plan.store_keep]
        cache.view(-1, hkv, d).index_copy_(0, plan.gqa_store_rows, torch.cat([k, v]).to(cache.dtype))
        group = q.shape[1] // hkv
        qf = q.float()
        out = None if plan.decode_all else qf.new_empty(qf.shape)
        if plan.decode_rows is not None:
            b = plan.decode_blocks.shape[0]
            keys, vals = _gqa_kv(cache, plan.decode_blocks)  # [B, Hkv, L, D]
            qd = qf if plan.decode_all else qf.index_select(0, plan.decode_rows)
            o = _attend_grouped(qd.view(b, hkv, group, d), keys, vals, plan.decode_bias[:, None, None, None, :],
                                scale, group).view(b, hkv * group, d)
            if plan.decode_all:
                out = o
            else:
                out.index_copy_(0, plan.decode_rows, o)
        for c in plan.chunks:
            keys, vals = _gqa_kv(cache, c.blocks)  # [Hkv, L, D]
            q_len = c.rows.stop - c.rows.start
            qc = qf[c.rows].view(q_len, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * q_len, d)
            o = _attend_grouped(qc, keys, vals, c.bias, scale, group)  # [Hkv, G * q, D]
            out[c.rows] = o.view(hkv, group, q_len, d).permute(2, 0, 1, 3).reshape(q_len, hkv * group, d)
        return out.to(q.dtype)

    def mla(self, layer, q_nope, q_rope, latent, k_rope, weights: MLAWeights, ctx, scale):
        plan = step_plan(ctx)
        cache = ctx.kv_caches[layer]  # [N, bs, R + Dr]
        n_blocks, bs, width = cache.shape
        new = torch.cat([latent, k_rope], dim=-1)
        if plan.store_keep is not None:
            new = new[plan.store_keep]
        cache.view(n_blocks * bs, width).index_copy_(0, plan.store_slots, new.to(cache.dtype))
        rank = latent.shape[-1]
        # Absorb W_UK into the query: scores need only the latent, never the expanded keys. The query
        # is [q_lat | q_rope], matching the cache row [latent | k_rope]: one product gives both terms.
        q_lat = torch.einsum("thn,hnr->thr", q_nope.float(), weights.w_uk.float())
        q_all = torch.cat([q_lat, q_rope.float()], dim=-1)  # [T, H, R + Dr]
        o_lat = None if plan.decode_all else q_all.new_empty(q_all.shape[0], q_all.shape[1], rank)
        if plan.decode_rows is not None:
            b, nb = plan.decode_blocks.shape
            kv = cache.index_select(0, plan.decode_blocks.flatten()).float().view(b, nb * bs, width)
            qd = q_all if plan.decode_all else q_all.index_select(0, plan.decode_rows)
            scores = torch.matmul(qd, kv.transpose(1, 2)).mul_(scale).add_(plan.decode_bias[:, None, :])
            od = torch.matmul(scores.softmax(dim=-1), kv[..., :rank])  # [B, H, R]
            if plan.decode_all:
                o_lat = od
            else:
                o_lat.index_copy_(0, plan.decode_rows, od)
        for c in plan.chunks:
            kv = cache.index_select(0, c.blocks).float().view(-1, width)  # [L, R + Dr]
            scores = torch.matmul(q_all[c.rows].transpose(0, 1), kv.t()).mul_(scale).add_(c.bias)  # [H, q, L]
            o_lat[c.rows] = torch.matmul(scores.softmax(dim=-1), kv[:, :rank]).transpose(0, 1)
        return torch.einsum("thr,hvr->thv", o_lat, weights.w_uv.float()).to(q_nope.dtype)
