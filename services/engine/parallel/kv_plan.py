"""Which prefill rank sends which KV heads to which decode rank (the KV link between two TP groups).

Each rank of a group holds a contiguous range of the GQA KV heads (sharding.kv_heads: split when TP <= KV
heads, one replicated head per rank beyond). A decode rank gets each of its heads from exactly one prefill
rank, the first that holds it, so a replicated head is never sent twice to the same rank. With the MLA
latent (or when every rank holds every KV head) rank 0 sends the whole cache to every decode rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmserve.engine.parallel.parallel_state import ParallelState
from glmserve.engine.parallel.sharding import kv_heads


@dataclass(frozen=True)
class RankLink:
    """Prefill rank src_rank sends heads [src_head, src_head + num_heads) of its cache into heads
    [dst_head, dst_head + num_heads) of decode rank dst_rank's. num_heads 0: the whole cache as is."""

    src_rank: int
    dst_rank: int
    src_head: int = 0
    dst_head: int = 0
    num_heads: int = 0


def head_layout(model_cfg, tp: int) -> list[tuple[int, int]] | None:
    """Each rank's (first KV head, count); None when every rank holds the whole KV (MLA latent, or all
    KV heads on each rank)."""
    if model_cfg.is_mla or tp == 1:
        return None
    slices = [kv_heads(model_cfg.num_attention_heads, model_cfg.num_key_value_heads, ParallelState(rank=r, size=tp))
              for r in range(tp)]
    return None if all(n == model_cfg.num_key_value_heads for _, n in slices) else slices


def rank_links(model_cfg, prefill_tp: int, decode_tp: int) -> list[RankLink]:
    """Every (prefill rank -> decode rank) link with the heads it carries, by decode rank then head."""
    src, dst = head_layout(model_cfg, prefill_tp), head_layout(model_cfg, decode_tp)
    if src is None and dst is None:
        return [RankLink(0, d) for d in range(decode_tp)]
    total = model_cfg.num_key_value_heads
    src = src or [(0, total)]
    dst = dst or [(0, total)] * decode_tp
    links: list[RankLink] = []
    for d, (first, count) in enumerate(dst):
        for head in range(first, first + count):
            r = next(r for r, (a, n) in enumerate(src) if a <= head < a + n)
            last = links[-1] if links else None
            if last and last.dst_rank == d and last.src_rank == r and last.dst_head + last.num_heads == head - first:
                links[-1] = RankLink(r, d, last.src_head, last.dst_head, last.num_heads + 1)
            else:
                links.append(RankLink(r, d, head - src[r][0], head - first, 1))
    return links


def is_plain(links: list[RankLink]) -> bool:
    """One link, rank 0 to rank 0, the whole cache: the single-process KV link does it unchanged."""
    return len(links) == 1 and links[0] == RankLink(0, 0)


def head_view(cache, first: int, count: int):
    """The heads [first, first + count) of a GQA layer cache `[N, 2, bs, Hkv, D]` (a view); count 0: all of it."""
    return cache if count == 0 else cache[:, :, :, first : first + count]
