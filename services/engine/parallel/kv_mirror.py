"""The whole GQA KV on a TP worker's leader, for the KV link when the ranks split the KV heads.

First version of KV transfer between groups (README "Tensor and expert parallelism"): the link stays leader
to leader and carries every KV head. On a prefill worker the leader gathers, after each layer of each step,
the blocks the step wrote from every rank into a full-head copy of the cache (the mirror), which the link
sends from. On a decode worker the link lands into the leader's mirror, and once a request's KV is complete
the leader broadcasts those blocks' rows and every rank keeps the heads it holds. The mirror costs the
leader one more whole KV cache; each prefill rank sending its heads straight to the decode ranks holding
them would avoid that and the extra hops.
"""

from __future__ import annotations

import torch

from glmserve.engine.parallel.parallel_state import ParallelState

HEAD_DIM = 3  # GQA cache layer: [blocks, 2 (K, V), block size, KV heads, head dim]


class KVMirror:
    def __init__(self, caches: list[torch.Tensor], num_kv_heads: int, slices: list[tuple[int, int]]):
        """caches: this rank's (the leader's); slices: (first KV head, count) held by each rank."""
        shape = list(caches[0].shape)
        shape[HEAD_DIM] = num_kv_heads
        self.caches = [torch.zeros(shape, dtype=c.dtype, device=c.device) for c in caches]
        self.slices = slices
        # A head held by several ranks (TP > KV heads) is taken from the first of them.
        seen: set[int] = set()
        self.sources = []
        for rank, (first, n) in enumerate(slices):
            if first not in seen:
                seen.add(first)
                self.sources.append((rank, first, n))


def touched_blocks(chunks, block_size: int) -> list[int]:
    """The blocks a step writes KV into (the same list on every rank: built from the same chunks)."""
    out: list[int] = []
    for c in chunks:
        r, start = c.request, c.request.num_computed_tokens
        out += r.block_ids[start // block_size : -(-(start + c.num_new_tokens) // block_size)]
    return out


def gather_layer(cache: torch.Tensor, block_ids: list[int], st: ParallelState, mirror: KVMirror | None,
                 layer: int) -> None:
    """Every rank's heads of these blocks into the leader's mirror (collective: all ranks call it)."""
    if not block_ids:
        return
    idx = torch.as_tensor(block_ids, dtype=torch.int64, device=cache.device)
    rows = cache.index_select(0, idx)
    parts = [torch.empty_like(rows) for _ in range(st.size)] if st.rank == 0 else None
    torch.distributed.gather(rows, parts, dst=0, group=st.group)
    if st.rank == 0:
        full = mirror.caches[layer]
        for rank, first, n in mirror.sources:
            full[idx, :, :, first : first + n] = parts[rank]


def own_heads(rows: torch.Tensor, slices: list[tuple[int, int]] | None, rank: int) -> torch.Tensor:
    """Full-head rows [layers, blocks, ...] cut to the heads this rank holds (as is without slices)."""
    if slices is None:
        return rows
    first, n = slices[rank]
    return rows[:, :, :, :, first : first + n].contiguous()
