"""The decode side of the KV link on a TP group: every rank receives its own KV heads straight into its
own cache (kv_plan.py says from which prefill rank), and the leader keeps the control.

Each rank runs a `KVLinkServer` (`RankKVEndpoint`). The leader registers a request's transfer on every
rank before the prefill worker is asked to send it, and the request is ready only once every rank has all
its (layer, token) pairs. The followers hear from the leader over a gloo group of their own
(`KVControl`, one thread per rank, beside the step loop): each round the leader broadcasts what the
followers must do (expect / cancel) and gathers their answers plus what completed or failed since the
last round. A cancel returns once no rank writes into the transfer's blocks any more, as on one process.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from glmserve.engine.kv_link import KVLinkError, KVTransferError, LinkAddress, LinkEvent, LinkObserver, notify, \
    resolve_future
from glmserve.engine.kv_receiver import KVLinkServer, TransferHandle
from glmserve.engine.parallel.distributed import group_error_line
from glmserve.engine.parallel.kv_plan import head_view

log = logging.getLogger(__name__)

POLL_S = 0.005  # a round this often while a follower has a transfer in flight
IDLE_S = 1.0  # and this often otherwise: keeps the control group inside its timeout

# (source rank, first destination head, head count; 0 = the whole cache) of each link into one rank.
RankSources = Sequence[tuple[int, int, int]]


@dataclass(frozen=True)
class Expect:
    transfer_id: int
    peer: str
    sources: RankSources
    block_ids: list[int]
    num_tokens: int
    num_layers: int
    first_token: int


class RankKVEndpoint:
    """One rank's KV link server and the transfers expected into its cache."""

    def __init__(self, server: KVLinkServer, kv_caches: Sequence[torch.Tensor], rank: int, advertise_host: str):
        self.server, self.kv_caches, self.rank = server, list(kv_caches), rank
        self.advertise_host = advertise_host  # what the prefill ranks connect to (the server may bind 0.0.0.0)
        self._handles: dict[int, list[TransferHandle]] = {}
        self._lock = threading.Lock()

    def expect(self, e: Expect) -> tuple[list[LinkAddress], list[TransferHandle]]:
        """One receiver per source rank (link peer `PEER#pSRC>dRANK`), each landing in its heads of the cache."""
        addresses, handles = [], []
        try:
            for src, head, n in e.sources:
                rx = self.server.receiver(f"{e.peer}#p{src}>d{self.rank}")
                caches = [head_view(c, head, n) for c in self.kv_caches]
                handles.append(rx.expect(e.transfer_id, caches, e.block_ids, e.num_tokens, e.num_layers,
                                         e.first_token))
                addresses.append(LinkAddress(self.advertise_host, rx.address.port, rx.address.name))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        with self._lock:
            self._handles[e.transfer_id] = handles
        return addresses, handles

    def cancel(self, transfer_id: int) -> None:
        with self._lock:
            handles = self._handles.pop(transfer_id, [])
        for h in handles:
            h.cancel()

    def finished(self) -> dict[int, str | None]:
        """Transfers done since the last call: None when every link's KV landed, else why one failed (its
        other links are cancelled first: nothing lands in the blocks once reported)."""
        out: dict[int, str | None] = {}
        with self._lock:
            items = list(self._handles.items())
        for tid, handles in items:
            bad = [h.future for h in handles if h.future.done() and (h.future.cancelled() or h.future.exception())]
            if not bad and not all(h.future.done() for h in handles):
                continue
            for h in handles if bad else ():
                h.cancel()  # before the entry goes: a concurrent cancel(tid) must not return earlier
            with self._lock:
                if self._handles.pop(tid, None) is None:
                    continue  # cancelled meanwhile
            out[tid] = None if not bad else ("cancelled" if bad[0].cancelled() else str(bad[0].exception()))
        return out

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._handles)

    def close(self) -> None:
        self.server.close()


@dataclass(eq=False)
class GroupTransfer:
    """The leader's view of one transfer on every rank: `future` resolves (bytes on the leader) once all
    ranks have their KV, fails with KVTransferError as soon as one rank's fails."""

    transfer_id: int
    group: "KVRankGroup"
    future: Future = field(default_factory=Future)
    pending: set[int] = field(default_factory=set)  # ranks whose KV has not all landed
    local: list[TransferHandle] = field(default_factory=list)
    bytes: int = 0

    def part_done(self, rank: int, error: str | None) -> None:
        if error is not None:
            resolve_future(self.future, exc=KVTransferError(f"decode rank {rank}: {error}"))
            return
        self.pending.discard(rank)
        if not self.pending:
            resolve_future(self.future, self.bytes)

    def cancel(self) -> None:
        self.group.cancel(self)


class KVRankGroup:
    """The leader's KV link control over its group (or over itself alone: a TP 1 decode worker receiving
    from a TP prefill group's ranks)."""

    def __init__(self, local: RankKVEndpoint, size: int = 1, control_group=None,
                 observer: LinkObserver | None = None, on_broken: Callable[[str], None] | None = None):
        self.local, self.size, self._group, self._observer = local, size, control_group, observer
        self._on_broken = on_broken  # a rank is gone (the rounds run even when idle): the worker must end
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._ops: list[tuple[int, tuple, Future]] = []  # (rank, op, future of its result)
        self._transfers: dict[int, GroupTransfer] = {}
        self._remote_pending = 0
        self._closed = False
        self.error: str | None = None
        self._thread = None
        if size > 1:
            self._thread = threading.Thread(target=self._run, name="kv-rank-control", daemon=True)
            self._thread.start()

    def new_transfer_id(self) -> int:
        return next(self._ids)

    def expect(self, expects: dict[int, Expect]) -> tuple[GroupTransfer, dict[int, list[LinkAddress]]]:
        """Register the transfer on every rank named (rank -> what it receives); returns the handle and each
        rank's link addresses, in the order of its sources."""
        tid = next(iter(expects.values())).transfer_id
        t = GroupTransfer(tid, self, pending=set(expects))
        with self._cv:
            self._transfers[tid] = t
        addresses: dict[int, list[LinkAddress]] = {}
        try:
            waits = {r: self._submit(r, ("expect", e)) for r, e in expects.items() if r != 0}
            if 0 in expects:
                addresses[0], t.local = self.local.expect(expects[0])
                left = [len(t.local)]
                for h in t.local:
                    h.future.add_done_callback(lambda f, n=left: self._local_done(t, f, n))
            for r, fut in waits.items():
                addresses[r] = fut.result()
        except BaseException:
            self.cancel(t)
            raise
        return t, addresses

    def _local_done(self, t: GroupTransfer, f: Future, left: list[int]) -> None:
        """A link into the leader's own cache is done (on that link's receiver thread)."""
        if f.cancelled() or f.exception() is not None:
            t.part_done(0, str(f.exception()) if not f.cancelled() else "cancelled")
        else:
            with self._cv:
                t.bytes += f.result() or 0
                left[0] -= 1
                last = left[0] == 0
            if last:
                t.part_done(0, None)
        self.local.finished()  # forget what is over (the followers' endpoints do it at each round)

    def cancel(self, t: GroupTransfer) -> None:
        """Returns once no rank writes into the transfer's blocks (a broken group writes nothing more)."""
        with self._cv:
            self._transfers.pop(t.transfer_id, None)
        self.local.cancel(t.transfer_id)
        waits = [self._submit(r, ("cancel", t.transfer_id)) for r in range(1, self.size)]
        for fut in waits:
            try:
                fut.result()
            except KVTransferError:
                pass
        resolve_future(t.future, exc=KVTransferError(f"transfer {t.transfer_id} cancelled by the decode side"))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(5)
        self.local.close()

    # -- the control rounds (leader thread) ------------------------------------------------------

    def _submit(self, rank: int, op: tuple) -> Future:
        fut: Future = Future()
        with self._cv:
            if self.error is not None or self._closed:
                fut.set_exception(KVLinkError(f"decode rank {rank} unreachable: {self.error or 'closed'}"))
            else:
                self._ops.append((rank, op, fut))
                self._cv.notify_all()
        return fut

    def _run(self) -> None:
        last = time.monotonic()
        try:
            while True:
                with self._cv:
                    while not self._ops and not self._closed:
                        wait = (POLL_S if self._remote_pending else IDLE_S) - (time.monotonic() - last)
                        if wait <= 0:
                            break
                        self._cv.wait(wait)
                    ops, self._ops = self._ops, []
                    closing = self._closed
                if closing:
                    for _, _, fut in ops:
                        resolve_future(fut, exc=KVLinkError("the decode worker is closing"))
                    dist.broadcast_object_list([None], src=0, group=self._group)
                    return
                self._round(ops)
                last = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - the group broke (a rank died)
            first = group_error_line(exc)
            with self._cv:
                busy = bool(self._transfers or self._remote_pending)
            self._broken(f"the tensor-parallel group broke during a KV control round ({first})" if busy else
                         f"the tensor-parallel group broke while idle (KV control round: {first})")

    def _round(self, ops: list[tuple[int, tuple, Future]]) -> None:
        per_rank: list[list[tuple]] = [[] for _ in range(self.size)]
        for rank, op, _ in ops:
            per_rank[rank].append(op)
        dist.broadcast_object_list([per_rank], src=0, group=self._group)
        replies: list = [None] * self.size
        dist.all_gather_object(replies, None, group=self._group)
        pending = 0
        for rank in range(1, self.size):
            results, finished, events, num_pending = replies[rank]
            pending += num_pending
            for ev in events:
                notify(self._observer, LinkEvent(*ev))
            for tid, error in finished.items():
                with self._cv:
                    t = self._transfers.get(tid)
                if t is not None:
                    t.part_done(rank, error)
            for (r, _, fut), res in zip([o for o in ops if o[0] == rank], results):
                if isinstance(res, str):
                    resolve_future(fut, exc=KVTransferError(f"decode rank {rank}: {res}"))
                else:
                    resolve_future(fut, res)
        with self._cv:
            self._remote_pending = pending
            for tid in [tid for tid, t in self._transfers.items() if t.future.done()]:
                del self._transfers[tid]

    def _broken(self, reason: str) -> None:
        with self._cv:
            self.error = reason
            closing = self._closed
            ops, self._ops = self._ops, []
            transfers, self._transfers = list(self._transfers.values()), {}
        for _, _, fut in ops:
            resolve_future(fut, exc=KVLinkError(reason))
        for t in transfers:
            resolve_future(t.future, exc=KVLinkError(reason))
        if not closing:
            log.error("%s", reason)
            if self._on_broken is not None:
                self._on_broken(reason)


def follower_control(endpoint: RankKVEndpoint, group, events: "EventBuffer") -> None:
    """A follower's side of the rounds, until the leader says stop (or the group breaks)."""
    rank = endpoint.rank
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is None:
            endpoint.close()
            return
        results = []
        for kind, arg in box[0][rank]:
            try:
                if kind == "expect":
                    results.append(endpoint.expect(arg)[0])
                else:
                    endpoint.cancel(arg)
                    results.append(None)
            except Exception as exc:  # noqa: BLE001 - told to the leader, which fails the request
                results.append(str(exc) or repr(exc))
        reply = (results, endpoint.finished(), events.take(), endpoint.num_pending)
        dist.all_gather_object([None] * dist.get_world_size(group), reply, group=group)


class EventBuffer:
    """A follower's link events (an observer), kept for the next round: the leader's metrics count them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: list[tuple] = []

    def __call__(self, ev: LinkEvent) -> None:
        with self._lock:
            self._events.append((ev.link, ev.kind, ev.direction, ev.value))

    def take(self) -> list[tuple]:
        with self._lock:
            out, self._events = self._events, []
        return out
