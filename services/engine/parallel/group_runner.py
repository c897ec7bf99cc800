"""A worker as a group of ranks: the leader (rank 0) schedules and samples; every rank runs its shard.

Each step the leader broadcasts what the step needs (per chunk: request id, first new position, the new
tokens, the blocks gained since the last step) on the group's CPU channel, then runs the forward; the followers rebuild the
same chunks and run the same forward, so every collective inside the model pairs up. Logits are gathered
on every rank, but only the leader samples. Step inputs rows freed on the leader are freed on the
followers with the next message.

KV that reached the leader from outside the group (a prefill worker's, over the KV link) is copied to
the followers with the next step message (`share_kv`). When the ranks split the GQA KV heads, the link
reads and writes a full-head mirror on the leader instead (kv_mirror.py): prefill steps gather every
layer's new blocks into it, and the decode leader's copy gives each rank its own heads.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from glmserve.engine.parallel.kv_mirror import HEAD_DIM, KVMirror, gather_layer, own_heads, touched_blocks
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


def _copy_blocks(kv_caches, imported: tuple | None, st: ParallelState, mirror: KVMirror | None = None) -> None:
    """The leader's rows of these blocks (from its mirror when it has one), every layer, into the same
    blocks of every rank (one broadcast); with a mirror each rank keeps its own heads, the leader too.
    imported: (block ids, each rank's (first head, count) or None, full head count)."""
    if imported is None:
        return
    block_ids, slices, full_heads = imported
    first = kv_caches[0]
    idx = torch.as_tensor(block_ids, dtype=torch.int64, device=first.device)
    if st.rank == 0:
        rows = torch.stack([c.index_select(0, idx) for c in (mirror.caches if mirror is not None else kv_caches)])
    else:
        shape = list(first.shape[1:])
        if slices is not None:
            shape[HEAD_DIM - 1] = full_heads
        rows = torch.empty((len(kv_caches), len(block_ids), *shape), dtype=first.dtype, device=first.device)
    torch.distributed.broadcast(rows, src=0, group=st.group)
    if st.rank != 0 or slices is not None:
        for c, r in zip(kv_caches, own_heads(rows, slices, st.rank)):
            c.index_copy_(0, idx, r)


def _gathering(kv_caches, block_ids: list[int], st: ParallelState, mirror: KVMirror | None,
               then: Callable[[int], None] | None) -> Callable[[int], None]:
    """A per-layer hook that first gathers the layer's new blocks into the leader's mirror."""
    def hook(layer: int) -> None:
        gather_layer(kv_caches[layer], block_ids, st, mirror, layer)
        if then is not None:
            then(layer)

    return hook


class LeaderRunner:
    """The leader's ModelRunner: same interface, each step announced to the followers first."""

    def __init__(self, runner, st: ParallelState):
        self.runner = runner
        self.st = st
        self._released: list[str] = []
        self._imported: list[int] = []  # blocks whose KV arrived from outside, not yet on the followers
        self.mirror: KVMirror | None = None  # the whole KV heads, when the ranks split them (kv_mirror.py)
        self._gather_steps = False  # prefill: every step's new KV goes into the mirror
        self._known: dict[str, int] = {}  # blocks of each live request the followers already have
        self._closed = False
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

    def keep_full_kv(self, mirror: KVMirror, gather_steps: bool) -> None:
        self.mirror, self._gather_steps = mirror, gather_steps

    @property
    def link_kv_caches(self) -> list[torch.Tensor]:
        """What the KV link sends from and lands in: the mirror, else this rank's cache (the whole KV)."""
        return self.mirror.caches if self.mirror is not None else self.runner.kv_caches

    def share_kv(self, block_ids: list[int]) -> None:
        """These blocks' KV landed on the leader only: the followers get it before the next step runs."""
        self._imported += block_ids

    def execute(self, chunks, on_layer_done: Callable[[int], None] | None = None, keep_hidden: bool = False):
        released, self._released = self._released, []
        imported, self._imported = self._imported, []
        m = self.mirror
        imp = (imported, m.slices if m else None, m.caches[0].shape[HEAD_DIM] if m else 0) if imported else None
        try:
            with self._sending:
                _broadcast(("step", released, _describe(chunks, self._known), imp, self._gather_steps), self.st)
                self._last_message = time.monotonic()
                _copy_blocks(self.runner.kv_caches, imp, self.st, m)
                if self._gather_steps:
                    caches = self.runner.kv_caches
                    blocks = touched_blocks(chunks, caches[0].shape[2])
                    on_layer_done = _gathering(caches, blocks, self.st, m, on_layer_done)
                return self.runner.execute(chunks, on_layer_done, keep_hidden)
        except RuntimeError as exc:  # gloo/NCCL: a peer closed its connection or timed out
            if self.on_broken is not None:
                first = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0]  # gloo adds advice
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
                _broadcast((_IDLE, [], [], None, False), self.st)
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
                _broadcast((_STOP, [], [], None, False), self.st)
            except RuntimeError as exc:
                logger.warning("tensor-parallel group already broken at shutdown: %s", exc)


def follower_loop(runner, st: ParallelState) -> None:
    """Run the leader's steps on this rank until it says stop (or the group breaks: raises)."""
    tables: dict[str, list[int]] = {}  # each live request's block table, grown by the leader's messages
    while True:
        kind, released, described, imported, gather = _broadcast(None, st)
        if kind == _STOP:
            return
        if kind == _IDLE:
            continue
        _copy_blocks(runner.kv_caches, imported, st)
        for rid in released:
            tables.pop(rid, None)
        runner.release_rows(released)
        chunks = _rebuild(described, tables)
        hook = None
        if gather:
            hook = _gathering(runner.kv_caches, touched_blocks(chunks, runner.kv_caches[0].shape[2]), st, None, None)
        runner.execute(chunks, hook)
