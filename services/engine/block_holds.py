"""Delayed free: blocks a request gave up while KV is still being sent straight out of them.

The prefill worker sends whole blocks from its paged cache without a staging copy, so a request's
blocks must outlive the request until the link has sent them (its last send may still be queued when
the request finishes, is aborted or preempted). Such blocks keep their pool reference: they count as
used, are never handed out again and never evicted. When the send is done (sent, cancelled, or the
link failed) they go back to the pool on the engine thread, the only one that touches the pool.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from typing import Callable

from glmserve.engine.block_pool import BlockPool


class BlockHolds:
    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.num_holds = 0  # holds not yet given back (engine thread)
        self._done: deque[list[int]] = deque()  # appended by any thread, drained by the engine thread
        # Called from the thread that completed a hold: an idle engine thread must wake up to free it.
        self.on_done: Callable[[], None] = lambda: None

    def hold(self, block_ids: list[int], sent: Future) -> None:
        """Keep block_ids (already referenced by the caller) until `sent` is done, however it ends."""
        self.num_holds += 1
        sent.add_done_callback(lambda _: self._finished(block_ids))

    def _finished(self, block_ids: list[int]) -> None:
        self._done.append(block_ids)
        self.on_done()

    def free_done(self) -> None:
        """Engine thread: hand back the blocks whose sends are over."""
        done = self._done
        while done:
            self.pool.free(done.popleft())
            self.num_holds -= 1
