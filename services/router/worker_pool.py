"""The router's view of its workers: channels, health and load (polled), and how it picks one.

Workers come from a WorkerDiscovery (static lists, or Kubernetes). A worker that fails a poll, drains,
or breaks a stream leaves the pool at once and returns when a poll finds it serving again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from glmserve.engine.block_pool import chain_hashes
from glmserve.metrics import ServiceMetrics
from glmserve.protos import worker_pb2 as pb
from glmserve.protos import worker_pb2_grpc as pb_grpc
from glmserve.router.discovery import WorkerDiscovery
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
    cached_hashes: frozenset[int] = field(default_factory=frozenset)
    inflight: int = 0  # requests the router sent here that have not finished
    failed_polls: int = 0  # consecutive load polls that failed

    def decode_score(self) -> tuple:
        """Lower is better: KV usage in 10% steps (so near-equal workers are not told apart by a few
        blocks), then requests in flight, then free blocks."""
        load = self.load
        total = load.total_blocks if load and load.total_blocks else 1
        free = load.free_blocks if load else 0
        running = (load.running_requests + load.waiting_requests) if load else 0
        return (int(10 * (1 - free / total)), running + self.inflight, -free)


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
            report = await w.stub.GetLoad(pb.LoadRequest(), timeout=max(1.0, self.poll_interval * 2))
            w.load = report
            w.healthy = report.state == pb.SERVING_STATE_SERVING
            reason = f"state {pb.ServingState.Name(report.state)}"
            if report.block_size:
                self.block_size = report.block_size
            if w.role == "prefill":
                w.cached_hashes = frozenset(report.cached_block_hashes)
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
            log.warning("%s worker %s %s the pool (%s)", w.role, w.address, "joins" if w.healthy else "leaves", reason)
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
    def pick_decode(self, exclude: set[str] = frozenset()) -> Worker | None:
        pool = [w for w in self.healthy("decode") if w.address not in exclude]
        if not pool:
            return None
        if self.policy == "round-robin":
            return pool[next(self._rr) % len(pool)]
        return min(pool, key=Worker.decode_score)

    def pick_prefill(self, prompt: list[int]) -> Worker | None:
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
        hashes = chain_hashes(prompt, self.block_size)

        def matched(w: Worker) -> int:
            n = 0
            for h in hashes:
                if h not in w.cached_hashes:
                    break
                n += 1
            return n

        best = max(pool, key=lambda w: (matched(w), -queued(w)))
        # Affinity wins unless that worker is much more loaded than the least loaded one.
        if matched(best) and queued(best) - queued(least) <= self.affinity_slack_tokens:
            best.cached_hashes = best.cached_hashes | frozenset(hashes)
            return best
        least.cached_hashes = least.cached_hashes | frozenset(hashes)  # it will hold them after this request
        return least

    def describe(self) -> dict:
        # MessageToDict directly: glmserve.worker.load reaches the engine, hence torch.
        from google.protobuf.json_format import MessageToDict

        return {f"{w.role}:{w.address}": {"healthy": w.healthy, "inflight": w.inflight,
                                          "load": MessageToDict(w.load, preserving_proto_field_name=True) if w.load else None}
                for w in self.workers.values()}
