"""A worker as a group of ranks: the leader (rank 0) schedules and samples; every rank runs its shard.

Each step the leader broadcasts what the step needs (per chunk: request id, first new position, the new
tokens, the blocks gained since the last step) on the group's CPU channel, then runs the forward; the followers rebuild the
same chunks and run the same forward, so every collective inside the model pairs up. Logits are gathered
on every rank, but only the leader samples. Step inputs rows freed on the leader are freed on the
followers with the next message.

KV from outside the group (a prefill worker's, over the KV link) lands on every rank straight into its own
cache, and prefill ranks send their own heads: each rank has its own KV link endpoints (kv_ranks.py,
kv_rank_sends.py), which the leader sets up with one `kv_setup` message. A prefill leader adds to each
step message what the followers send from that step (its KV streamer's plan).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from glmserve.engine.parallel.distributed import group_error_line
from glmserve.engine.parallel.parallel_state import ParallelState

logger = logging.getLogger(__name__)

_STOP = "stop"
_IDLE = "idle"  # no step: keeps the followers' wait for the next message inside the group timeout


class _OffsetTokens:
    """The new tokens of a chunk, indexed by their position in the sequence, with the sequence's length
    (what the model runner reads of a request's token list)."""

    __slots__ = ("start", "ids", "total")

    def __init__(self, start: int, ids: list[int], total: int):
        self.start, self.ids, self.total = start, ids, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.ids[k.start - self.start : k.stop - self.start]
        return self.ids[k - self.start]


@dataclass
class _FollowerRequest:
    request_id: str
    num_computed_tokens: int
    num_tokens: int
    block_ids: list[int]
    token_ids: _OffsetTokens


@dataclass
class _FollowerChunk:
    request: _FollowerRequest
    num_new_tokens: int
    completes_sequence: bool


def _describe(chunks, known: dict[str, int]) -> list[tuple]:
    """Per chunk: (request id, first new position, total tokens, blocks gained since the last step, new
    tokens, samples). Block tables only grow between releases (as StepInputBuilder assumes), so only
    their new tail travels: a decode step costs O(batch), not O(context)."""
    out = []
    for c in chunks:
        r, n = c.request, c.num_new_tokens
        start = r.num_computed_tokens
        blocks = r.block_ids
        sent = known.get(r.request_id, 0)
        known[r.request_id] = len(blocks)
        out.append((r.request_id, start, r.num_tokens, list(blocks[sent:]), list(r.token_ids[start : start + n]),
                    c.completes_sequence))
    return out


def _rebuild(described: list[tuple], tables: dict[str, list[int]]) -> list[_FollowerChunk]:
    chunks = []
    for rid, start, total, new_blocks, ids, done in described:
        blocks = tables.setdefault(rid, [])
        blocks += new_blocks
        chunks.append(_FollowerChunk(_FollowerRequest(rid, start, total, blocks, _OffsetTokens(start, ids, total)),
                                     len(ids), done))
    return chunks


def _broadcast(msg: Any, st: ParallelState) -> Any:
    box = [msg]
    torch.distributed.broadcast_object_list(box, src=0, group=st.cpu_group)
    return box[0]


class LeaderRunner:
    """The leader's ModelRunner: same interface, each step announced to the followers first."""

    def __init__(self, runner, st: ParallelState):
        self.runner = runner
        self.st = st
        self._released: list[str] = []
        self._known: dict[str, int] = {}  # blocks of each live request the followers already have
        self._closed = False
        # Prefill: what the followers send from the next step (KVStreamer.take_rank_plan), or None.
        self.rank_plan: Callable[[], Any] | None = None
        # Called with a one-line reason when a step fails because the group broke (a rank died).
        self.on_broken: Callable[[str], None] | None = None
        # Steps, idle messages and the stop message are broadcast from different threads: one at a time.
        self._sending = threading.Lock()
        self._last_message = time.monotonic()

    def __getattr__(self, name: str):  # num_blocks, kv_caches, inputs, cuda_graph_stats, ...
        return getattr(self.runner, name)

    def release_rows(self, request_ids: list[str]) -> None:
        self._released += request_ids
        for rid in request_ids:
            self._known.pop(rid, None)
        self.runner.release_rows(request_ids)

    def kv_setup(self, setup: dict, then: Callable[[], Any] | None = None) -> Any:
        """Have every follower start its KV link endpoint (kv_setup.py); `then` runs on this rank while the
        channel is still held (the collectives both sides make right after)."""
        with self._sending:
            _broadcast(("kv_setup", [], [], setup), self.st)
            self._last_message = time.monotonic()
            return then() if then is not None else None

    def execute(self, chunks, on_layer_done: Callable[[int], None] | None = None, keep_hidden: bool = False):
        released, self._released = self._released, []
        plan = self.rank_plan() if self.rank_plan is not None else None
        try:
            with self._sending:
                _broadcast(("step", released, _describe(chunks, self._known), plan), self.st)
                self._last_message = time.monotonic()
                return self.runner.execute(chunks, on_layer_done, keep_hidden)
        except RuntimeError as exc:  # gloo/NCCL: a peer closed its connection or timed out
            if self.on_broken is not None:
                first = group_error_line(exc)
                self.on_broken(f"the tensor-parallel group broke during a step ({first})")
            raise

    def keep_alive(self, idle_s: float) -> None:
        """After idle_s seconds without a message, send an empty one (the group's watcher calls this): the
        followers wait for the next step under the group timeout, so an idle group would otherwise break,
        and a follower that died while idle is found here. Raises RuntimeError when the group is broken."""
        if not self._sending.acquire(blocking=False):
            return  # a step is being announced or running: that is a message
        try:
            if not self._closed and time.monotonic() - self._last_message >= idle_s:
                _broadcast((_IDLE, [], [], None), self.st)
                self._last_message = time.monotonic()
        finally:
            self._sending.release()

    def close(self) -> None:
        """Tell the followers to exit (idempotent; a broken group is already gone)."""
        with self._sending:
            if self._closed:
                return
            self._closed = True
            try:
                _broadcast((_STOP, [], [], None), self.st)
            except RuntimeError as exc:
                logger.warning("tensor-parallel group already broken at shutdown: %s", exc)


def follower_loop(runner, st: ParallelState, node: "FollowerNode | None" = None) -> None:
    """Run the leader's steps on this rank until it says stop (or the group breaks: raises)."""
    from glmserve.engine.parallel.kv_setup import FollowerKV

    tables: dict[str, list[int]] = {}  # each live request's block table, grown by the leader's messages
    kv = FollowerKV(runner, st, node or FollowerNode())
    try:
        while True:
            kind, released, described, extra = _broadcast(None, st)
            if kind == _STOP:
                return
            if kind == _IDLE:
                continue
            if kind == "kv_setup":
                kv.setup(extra)
                continue
            for rid in released:
                tables.pop(rid, None)
            runner.release_rows(released)
            chunks = _rebuild(described, tables)
            runner.execute(chunks, kv.before_step(extra, chunks))
    finally:
        kv.close()


@dataclass(frozen=True)
class FollowerNode:
    """Where a follower runs: node 0 shares the leader's addresses; another node finds its own."""

    node_rank: int = 0
    init_addr: str = ""
