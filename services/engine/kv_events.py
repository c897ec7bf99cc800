"""A bounded log of prefix-cache changes (block hash stored / removed), read as deltas by the router.

vLLM publishes KV events so a router can track which worker holds which prefix without being sent the
whole cache state. Here the router polls: it names the last sequence number it applied (and the log's
epoch, which changes when a worker restarts) and gets the net change since then. When it is too far
behind (the log wrapped) or talks to a new epoch, it gets a full snapshot instead, flagged `reset`.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable


@dataclass
class KVEventDelta:
    epoch: int
    seq: int  # the last event included; pass it back to get only what follows
    reset: bool = False  # `stored` is the complete set: drop what you had
    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)


class KVEventLog:
    def __init__(self, capacity: int, snapshot: Callable[[], Iterable[int]]):
        self.epoch = random.SystemRandom().getrandbits(63) or 1
        self.seq = 0
        self._events: deque[tuple[int, int, bool]] = deque(maxlen=max(1, capacity))  # (seq, hash, stored)
        self._snapshot = snapshot

    def record(self, block_hash: int, stored: bool) -> None:
        self.seq += 1
        self._events.append((self.seq, block_hash, stored))

    def since(self, epoch: int, seq: int) -> KVEventDelta:
        oldest = self._events[0][0] if self._events else self.seq + 1
        if epoch != self.epoch or seq > self.seq or seq < oldest - 1:
            return KVEventDelta(self.epoch, self.seq, reset=True, stored=list(self._snapshot()))
        last: dict[int, bool] = {}
        # Events are in seq order; skip the applied prefix from the right end of the window.
        for ev_seq, h, stored in reversed(self._events):
            if ev_seq <= seq:
                break
            last.setdefault(h, stored)  # the newest event of a hash decides
        return KVEventDelta(self.epoch, self.seq, stored=[h for h, s in last.items() if s],
                            removed=[h for h, s in last.items() if not s])
