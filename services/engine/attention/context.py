"""Per-step attention metadata: one object per forward pass instead of long argument lists.

A step runs a flat batch of T new tokens from B sequences (prefill chunks and decode tokens mixed).
Sequence i owns new tokens `query_start_loc[i]:query_start_loc[i+1]`; after the step it holds
`seq_lens[i]` tokens of KV, the last `query_lens[i]` of which are the new ones. The new tokens' KV goes
to flat slots `slot_mapping` (slot = block_id * block_size + offset) of every layer's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B+1] int32, on the model's device
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64; -1 = do not store (padding)
    block_size: int
    kv_caches: list[torch.Tensor]  # one tensor per layer, layout from KVCacheSpec
    # Host copies, so reference backends and planners need no device syncs.
    query_lens_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)
    # Called with the layer index once that layer's new KV is in the cache (layer-wise KV transfer).
    on_layer_done: Callable[[int], None] | None = None
    # Backend-private per-step state (e.g. a FlashInfer plan), filled by AttentionBackend.prepare().
    backend_state: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_cpu)

    def layer_done(self, layer: int) -> None:
        if self.on_layer_done is not None:
            self.on_layer_done(layer)


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a step: its blocks, how many tokens are already cached, how many are new."""

    block_ids: list[int]
    num_cached: int
    num_new: int


def build_context(
    chunks: list[SeqChunk],
    block_size: int,
    kv_caches: list[torch.Tensor],
    device: torch.device,
    on_layer_done: Callable[[int], None] | None = None,
) -> ForwardContext:
    """Metadata for a step over `chunks` (the model runner and the tests both build steps this way)."""
    positions: list[int] = []
    slots: list[int] = []
    qsl = [0]
    for c in chunks:
        need = -(-(c.num_cached + c.num_new) // block_size)
        if len(c.block_ids) < need:
            raise ValueError(f"sequence needs {need} blocks for {c.num_cached + c.num_new} tokens, has {len(c.block_ids)}")
        for p in range(c.num_cached, c.num_cached + c.num_new):
            positions.append(p)
            slots.append(c.block_ids[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + c.num_new)
    width = max([len(c.block_ids) for c in chunks] + [1])
    table = torch.zeros(len(chunks), width, dtype=torch.int32)
    for i, c in enumerate(chunks):
        table[i, : len(c.block_ids)] = torch.tensor(c.block_ids, dtype=torch.int32)
    seq_lens = [c.num_cached + c.num_new for c in chunks]
    return ForwardContext(
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=table.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_size=block_size,
        kv_caches=kv_caches,
        query_lens_cpu=[c.num_new for c in chunks],
        seq_lens_cpu=seq_lens,
        on_layer_done=on_layer_done,
    )
