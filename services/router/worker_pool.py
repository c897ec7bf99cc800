"""The router's view of its workers: channels, health and load (polled), and how it picks one.

Workers come from a WorkerDiscovery (static lists, or Kubernetes). A worker that fails a poll, drains,
or breaks a stream leaves the pool at once and returns when a poll finds it serving again. Each poll
also brings the worker's prefix-cache changes since the last one (prefix_index.py), for both roles:
prefill goes where the prompt's prefix is cached (fewer tokens to compute), decode too when its load
allows (fewer tokens to move over the KV link).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from glmserve.metrics import ServiceMetrics
from glmserve.prefix_hash import chain_hashes
from glmserve.protos import worker_pb2 as pb
from glmserve.protos import worker_pb2_grpc as pb_grpc
from glmserve.router.discovery import WorkerDiscovery
from glmserve.router.prefix_index import PrefixIndex
from glmserve.worker.grpc_options import insecure_channel

log = logging.getLogger(__name__)

MAX_MISSED_POLLS = 3
REPOLL_S = 0.25  # while a request waits for a worker, the pool is re-polled this often


@dataclass
class Worker:
    address: str
    role: str
    channel: grpc.aio.Channel
    stub: object
    healthy: bool = False
    load: pb.LoadReport | None = None
    prefix: PrefixIndex = field(default_factory=PrefixIndex)
    inflight: int = 0  # requests the router sent here that have not finished
    failed_polls: int = 0  # consecutive load polls that failed

    def decode_score(self) -> tuple:
        """Lower is better: KV usage in 10% steps (so near-equal workers are not told apart by a few
        blocks), then requests in flight, then free blocks."""
        load = self.load
        total = load.total_blocks if load and load.total_blocks else 1
        free = load.free_blocks if load else 0
        running = (load.running_requests + load.waiting_requests) if load else 0
        return (self.usage_step(), running + self.inflight, -free)

    def usage_step(self) -> int:
        """KV usage in 10% steps, 0..10."""
        load = self.load
        total = load.total_blocks if load and load.total_blocks else 1
        return int(10 * (1 - (load.free_blocks if load else 0) / total))

    def busy(self) -> int:
        load = self.load
        return (load.running_requests + load.waiting_requests if load else 0) + self.inflight


class WorkerPool:
    def __init__(self, discovery: WorkerDiscovery, metrics: ServiceMetrics, poll_interval: float = 1.0,
                 policy: str = "prefix-affinity", affinity_slack_tokens: int = 4096):
        self.discovery = discovery
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.policy = policy
        self.affinity_slack_tokens = affinity_slack_tokens
        self.workers: dict[tuple[str, str], Worker] = {}
        self._rr = itertools.count()
        self._task: asyncio.Task | None = None
        self._polling: asyncio.Future | None = None
        self.block_size = 16

    # -- membership and health ----------------------------------------------------------------
    def _sync_membership(self) -> None:
        current = self.discovery.current()
        wanted = {(role, a) for role in ("prefill", "decode") for a in current.of(role)}
        for key in list(self.workers):
            if key not in wanted:
                w = self.workers.pop(key)
                self.metrics.get("worker_healthy", worker=w.address, worker_role=w.role).set(0)
                asyncio.ensure_future(w.channel.close())
        for role, address in wanted - set(self.workers):
            ch = insecure_channel(address)
            stub = pb_grpc.PrefillWorkerStub(ch) if role == "prefill" else pb_grpc.DecodeWorkerStub(ch)
            self.workers[(role, address)] = Worker(address, role, ch, stub)

    async def _poll_one(self, w: Worker) -> None:
        was_healthy = w.healthy
        reason = ""
        try:
            asked = pb.LoadRequest(kv_events_epoch=w.prefix.epoch, kv_events_seq=w.prefix.seq)
            report = await w.stub.GetLoad(asked, timeout=max(1.0, self.poll_interval * 2))
            w.prefix.apply(report.kv_events_epoch, report.kv_events_seq, report.kv_events_reset,
                           report.kv_stored_hashes, report.kv_removed_hashes, report.total_blocks)
            report.ClearField("kv_stored_hashes")  # applied; keep the report small
            report.ClearField("kv_removed_hashes")
            w.load = report
            w.healthy = report.state == pb.SERVING_STATE_SERVING
            reason = f"state {pb.ServingState.Name(report.state)}"
            if report.block_size:
                self.block_size = report.block_size
        except grpc.aio.AioRpcError as exc:
            # A refused connection means the worker is gone; a slow answer from a busy worker is not
            # enough to drop it (its streams are still flowing) unless it keeps missing polls.
            w.failed_polls += 1
            reason = f"load poll failed {w.failed_polls}x: {exc.code().name}"
            if exc.code() == grpc.StatusCode.UNAVAILABLE or w.failed_polls >= MAX_MISSED_POLLS:
                w.healthy = False
        else:
            w.failed_polls = 0
        if w.healthy != was_healthy:
            # Joining is routine (INFO); leaving is what an operator looks for (WARNING).
            log.log(logging.INFO if w.healthy else logging.WARNING, "%s worker %s %s the pool (%s)", w.role,
                    w.address, "joins" if w.healthy else "leaves", reason)
        self.metrics.get("worker_healthy", worker=w.address, worker_role=w.role).set(1 if w.healthy else 0)

    async def poll(self) -> None:
        self._sync_membership()
        await asyncio.gather(*(self._poll_one(w) for w in list(self.workers.values())))

    async def refresh(self) -> None:
        """Poll now; callers that arrive while a poll runs share it."""
        if self._polling is None or self._polling.done():
            self._polling = asyncio.ensure_future(self.poll())
        await asyncio.shield(self._polling)

    async def wait_for(self, pick: Callable[[], Worker | None], timeout: float) -> Worker | None:
        """pick() until it finds a worker, re-polling meanwhile, for at most timeout seconds: a worker
        that briefly left the pool (a missed poll, a restart) does not fail the requests of that moment."""
        deadline = time.monotonic() + timeout
        while (w := pick()) is None and time.monotonic() < deadline:
            await asyncio.sleep(min(REPOLL_S, max(0.0, deadline - time.monotonic())))
            await self.refresh()
        return w

    async def start(self) -> None:
        await self.discovery.start()
        await self.poll()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.refresh()
            except Exception:  # never let the health loop die
                log.exception("worker poll failed")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.discovery.stop()
        for w in self.workers.values():
            await w.channel.close()

    def mark_unhealthy(self, w: Worker, reason: str) -> None:
        if w.healthy:
            log.warning("%s worker %s leaves the pool (%s)", w.role, w.address, reason)
        w.healthy = False
        self.metrics.get("worker_healthy", worker=w.address, worker_role=w.role).set(0)

    def healthy(self, role: str) -> list[Worker]:
        return [w for (r, _), w in self.workers.items() if r == role and w.healthy]

    # -- choice -------------------------------------------------------------------------------
    def prompt_hashes(self, prompt: list[int]) -> list[int]:
        """Block hashes of a prompt, as the workers' prefix caches key them (computed once per request)."""
        return chain_hashes(prompt, self.block_size) if self.policy == "prefix-affinity" else []

    def pick_decode(self, exclude: set[str] = frozenset(), hashes: list[int] = ()) -> Worker | None:
        pool = [w for w in self.healthy("decode") if w.address not in exclude]
        if not pool:
            return None
        if self.policy == "round-robin":
            return pool[next(self._rr) % len(pool)]
        least = min(pool, key=Worker.decode_score)
        if hashes:
            # The worker holding the longest prefix moves the fewest KV bytes, if it is not clearly busier:
            # within one 10% step of KV usage and at most twice (plus a few) the requests of the least loaded.
            fit = [w for w in pool if w.usage_step() <= least.usage_step() + 1 and w.busy() <= 2 * least.busy() + 4]
            best = max(fit, key=lambda w: (w.prefix.matched_blocks(hashes), [-x for x in w.decode_score()]))
            if best.prefix.matched_blocks(hashes):
                least = best
            least.prefix.note_sent(hashes)
        return least

    def pick_prefill(self, prompt: list[int], hashes: list[int] | None = None) -> Worker | None:
        pool = self.healthy("prefill")
        if not pool:
            return None
        if self.policy == "round-robin":
            return pool[next(self._rr) % len(pool)]

        def queued(w: Worker) -> int:
            return (w.load.queued_tokens if w.load else 0) + w.inflight * len(prompt)

        least = min(pool, key=queued)
        if self.policy != "prefix-affinity":
            return least
        hashes = self.prompt_hashes(prompt) if hashes is None else hashes
        best = max(pool, key=lambda w: (w.prefix.matched_blocks(hashes), -queued(w)))
        # Affinity wins unless that worker is much more loaded than the least loaded one.
        chosen = best if best.prefix.matched_blocks(hashes) and queued(best) - queued(least) <= self.affinity_slack_tokens else least
        chosen.prefix.note_sent(hashes)  # it will hold them after this request
        return chosen

    def describe(self) -> dict:
        from google.protobuf.json_format import MessageToDict

        return {f"{w.role}:{w.address}": {"healthy": w.healthy, "inflight": w.inflight, "cached_blocks": len(w.prefix),
                                          "load": MessageToDict(w.load, preserving_proto_field_name=True) if w.load else None}
                for w in self.workers.values()}
