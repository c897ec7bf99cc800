"""Which prefixes each worker holds, kept from the workers' KV events (net deltas per load poll).

Memory is bounded by the workers' caches: a worker's prefix cache holds at most one hash per KV block,
so the router keeps at most `total_blocks` hashes per worker (8 bytes each plus set overhead, about
60 bytes per block in CPython: ~6 MB for a worker with 100k blocks), whatever the traffic. Requests
the router just sent are remembered for a few poll intervals (`recent`), so a burst with a shared
prefix follows its first request before the worker's events confirm it.
"""

from __future__ import annotations

import time
from typing import Sequence

RECENT_TTL_S = 3.0


class PrefixIndex:
    def __init__(self) -> None:
        self.epoch = 0
        self.seq = 0
        self.hashes: set[int] = set()
        self._recent: dict[int, float] = {}  # hash -> when a request with that block was sent here

    def apply(self, epoch: int, seq: int, reset: bool, stored: Sequence[int], removed: Sequence[int],
              capacity: int) -> None:
        """Apply one load report's deltas (the worker decides whether they are a full reset)."""
        if reset:
            self.hashes = set(stored)
        else:
            self.hashes.difference_update(removed)
            self.hashes.update(stored)
        for h in removed:  # the worker's word beats our guess
            self._recent.pop(h, None)
        self.epoch, self.seq = epoch, seq
        if capacity and len(self.hashes) > capacity:  # cannot happen with a well-behaved worker
            self.hashes.clear()
            self.epoch = 0  # ask for a snapshot next time
        now = time.monotonic()
        self._recent = {h: t for h, t in self._recent.items() if now - t < RECENT_TTL_S}

    def note_sent(self, hashes: Sequence[int]) -> None:
        now = time.monotonic()
        for h in hashes:
            self._recent[h] = now

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        """Length of the longest prefix of `hashes` the worker holds (or was just sent)."""
        n = 0
        for h in hashes:
            if h not in self.hashes and h not in self._recent:
                break
            n += 1
        return n

    def __len__(self) -> int:
        return len(self.hashes)
