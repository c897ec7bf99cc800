"""A worker as a group of ranks: the leader (rank 0) schedules and samples; every rank runs its shard.

Each step the leader broadcasts what the step needs (per chunk: request id, first new position, the new
tokens, the block table) on the group's CPU channel, then runs the forward; the followers rebuild the
same chunks and run the same forward, so every collective inside the model pairs up. Logits are gathered
on every rank, but only the leader samples. Step inputs rows freed on the leader are freed on the
followers with the next message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from glmserve.engine.parallel.parallel_state import ParallelState

logger = logging.getLogger(__name__)

_STOP = "stop"


class _OffsetTokens:
    """The new tokens of a chunk, indexed by their position in the sequence (what StepInputBuilder reads)."""

    __slots__ = ("start", "ids")

    def __init__(self, start: int, ids: list[int]):
        self.start, self.ids = start, ids

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


def _describe(chunks) -> list[tuple]:
    out = []
    for c in chunks:
        r, n = c.request, c.num_new_tokens
        start = r.num_computed_tokens
        out.append((r.request_id, start, r.num_tokens, list(r.block_ids), list(r.token_ids[start : start + n]),
                    c.completes_sequence))
    return out


def _rebuild(described: list[tuple]) -> list[_FollowerChunk]:
    return [_FollowerChunk(_FollowerRequest(rid, start, total, blocks, _OffsetTokens(start, ids)), len(ids), done)
            for rid, start, total, blocks, ids, done in described]


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
        self._closed = False
        # Called with a one-line reason when a step fails because the group broke (a rank died).
        self.on_broken: Callable[[str], None] | None = None

    def __getattr__(self, name: str):  # num_blocks, kv_caches, inputs, cuda_graph_stats, ...
        return getattr(self.runner, name)

    def release_rows(self, request_ids: list[str]) -> None:
        self._released += request_ids
        self.runner.release_rows(request_ids)

    def execute(self, chunks, on_layer_done: Callable[[int], None] | None = None, keep_hidden: bool = False):
        released, self._released = self._released, []
        try:
            _broadcast(("step", released, _describe(chunks)), self.st)
            return self.runner.execute(chunks, on_layer_done, keep_hidden)
        except RuntimeError as exc:  # gloo/NCCL: a peer closed its connection or timed out
            if self.on_broken is not None:
                first = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0]  # gloo adds advice
                self.on_broken(f"the tensor-parallel group broke during a step ({first})")
            raise

    def close(self) -> None:
        """Tell the followers to exit (idempotent; a broken group is already gone)."""
        if self._closed:
            return
        self._closed = True
        try:
            _broadcast((_STOP, [], []), self.st)
        except RuntimeError as exc:
            logger.warning("tensor-parallel group already broken at shutdown: %s", exc)


def follower_loop(runner, st: ParallelState) -> None:
    """Run the leader's steps on this rank until it says stop (or the group breaks: raises)."""
    while True:
        kind, released, described = _broadcast(None, st)
        if kind == _STOP:
            return
        runner.release_rows(released)
        runner.execute(_rebuild(described))
