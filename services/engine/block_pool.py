"""KV block pool with prefix caching on full blocks.

Blocks are reference-counted. A full block gets a content hash chained from its parent block's hash,
so a hit on block i implies the whole prefix up to i matches. Freed blocks keep their hash and stay
findable until the LRU free queue hands them out again (eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from glmserve.engine.kv_events import KVEventLog

# Events kept for routers that fell behind, per block of the pool (then they get a snapshot).
EVENTS_PER_BLOCK = 4
MAX_EVENTS = 1 << 18


class NoFreeBlocks(RuntimeError):
    pass


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first: the next to be evicted.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found
        self.events = KVEventLog(min(MAX_EVENTS, EVENTS_PER_BLOCK * num_blocks), snapshot=lambda: self._cached.keys())

    # -- accounting ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    # -- allocation ---------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocks(f"need {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self._blocks[block_id]
            if block.block_hash is not None:  # evict its cached content
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                    self.events.record(block.block_hash, stored=False)
                block.block_hash = None
            block.ref_count = 1
            out.append(block_id)
        # Ascending ids: a request's blocks then form runs of consecutive blocks (the free queue hands out
        # a freed request's blocks tail first), which the KV link sends and receives without gathering.
        out.sort()
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        # Tail blocks first into the queue: they are the least likely to be shared, so evicted first.
        for block_id in reversed(block_ids):
            block = self._blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    # -- prefix cache -------------------------------------------------------------------------
    def match_prefix(self, block_hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Take a reference on the longest run of cached blocks matching block_hashes[:max_blocks]."""
        hits: list[int] = []
        if self.enable_prefix_caching:
            for h in block_hashes[:max_blocks]:
                block_id = self._cached.get(h)
                if block_id is None:
                    break
                hits.append(block_id)
        for block_id in hits:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        return hits

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries += queried_tokens
        self.prefix_hits += hit_tokens

    def register_full_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[int]) -> None:
        """Make full blocks findable by content (no-op for blocks already registered)."""
        if not self.enable_prefix_caching:
            return
        for block_id, h in zip(block_ids, block_hashes):
            block = self._blocks[block_id]
            if block.block_hash is None:
                block.block_hash = h
                if h not in self._cached:
                    self._cached[h] = block_id
                    self.events.record(h, stored=True)
