"""Continuous batching under a token budget, chunked prefill, prefix reuse and preemption.

Every step serves running requests first (one token each for decoding ones, the next chunk for ones
still prefilling), then admits waiting ones while budget, sequence slots and KV blocks last. When a
running request cannot get a block, the most recently admitted running request is preempted: its
blocks are released (their prefix-cache hashes survive) and it is recomputed later. Nothing crashes
for lack of memory; a request that cannot fit even alone is finished with an error reason.

Requests whose prompt KV comes from a prefill worker (decode workers) wait in the same FIFO queue.
Admitting one reuses this worker's own prefix cache, allocates blocks for the rest of the prompt and
the first output token, and parks it as WAITING_FOR_REMOTE_KVS: it holds a sequence slot and its
blocks but computes nothing until `remote_kv_arrived`. Its admission is reported to the KV connector
(`kv_connector.blocks_allocated`), and freeing it for any reason tells the connector first, so that
no transfer writes into blocks after they are handed back.

A prefill worker that sends KV straight from its blocks (`send_guard`) may get a request's blocks
back only once those sends are done: until then they stay allocated (see block_holds.py).

Per-step cost follows the tokens that changed: each request registers only its newly filled blocks.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from glmserve.engine.block_holds import BlockHolds
from glmserve.engine.block_pool import BlockPool
from glmserve.engine.config import SchedulerConfig
from glmserve.engine.kv_transport import KVSendGuard, RemoteKVConnector
from glmserve.engine.request import FinishReason, Request, RequestStatus


@dataclass(slots=True)
class ScheduledChunk:
    """Never changed once made: a decode step's one-token chunk of a request is the same object every
    step (Request.decode_chunk), which spares an allocation per sequence per step."""

    request: Request
    num_new_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """After this chunk every token of the request is computed, so a next token is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens >= r.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Requests that can never fit in the cache (finished with LENGTH/abort by the scheduler).
    rejected: list[Request] = field(default_factory=list)
    # Requests whose blocks went back to the pool since the last step (the runner forgets their rows).
    released: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, pool: BlockPool):
        self.cfg = cfg
        self.pool = pool
        self.block_size = pool.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_kv: dict[str, Request] = {}
        self.kv_connector: RemoteKVConnector | None = None
        self.send_guard: KVSendGuard | None = None
        self.holds = BlockHolds(pool)
        self._released: list[str] = []
        self.num_preemptions = 0
        # Extra slots every sequence gets past its scheduled tokens (the drafts of speculative decoding).
        self.num_lookahead_tokens = 0
        # Seconds each newly admitted request waited; drained by the metrics exporter.
        self.queue_time_samples: list[float] = []

    # -- queue management ---------------------------------------------------------------------
    def add(self, req: Request) -> None:
        # Objects every decode step touches (the request's lists, its decode chunk) are made now, next to
        # the request, not at its first scheduling amid other requests' prefill allocations (block
        # hashes): at 8k-token contexts that scattered them over ~200 MB and cost TLB and cache misses.
        req.decode_chunk = ScheduledChunk(req, 1)
        self.waiting.append(req)

    def remote_kv_arrived(self, req: Request) -> None:
        """The prompt's KV landed in the request's blocks: it decodes from the next step on."""
        del self.waiting_for_kv[req.request_id]
        req.num_computed_tokens = req.num_tokens  # the whole prompt (a migrated one's includes earlier output)
        self._register_full_blocks(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    @property
    def num_seqs(self) -> int:
        """Sequences holding a slot: running, and parked waiting for remote KV."""
        return len(self.running) + len(self.waiting_for_kv)

    @property
    def num_waiting_remote(self) -> int:
        """Requests queued for blocks whose KV will come from a prefill worker."""
        return sum(1 for r in self.waiting if r.remote_prefill)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: FinishReason | None = None) -> None:
        """Release a request's blocks and drop it from the queues (abort, or after a stop)."""
        if reason is not None and not req.is_finished:
            req.finish(reason)
        if self.waiting_for_kv.pop(req.request_id, None) is not None and self.kv_connector is not None:
            self.kv_connector.request_freed(req)  # stop the transfer before its blocks are reused
        elif req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self._release(req)

    def _release(self, req: Request) -> None:
        req.decode_chunk = None  # it points back at req: no cycle left behind
        if req.block_ids:
            sent = self.send_guard.blocks_released(req) if self.send_guard is not None else None
            if sent is None:
                self.pool.free(req.block_ids)
            else:
                self.holds.hold(req.block_ids, sent)
            req.block_ids = []
            self._released.append(req.request_id)
        req.num_registered_blocks = 0

    def queued_prompt_tokens(self) -> int:
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)

    # -- scheduling ---------------------------------------------------------------------------
    def _blocks_needed(self, req: Request, num_new: int) -> int:
        total = -(-(req.num_computed_tokens + num_new + self.num_lookahead_tokens) // self.block_size)
        return max(0, total - len(req.block_ids))

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self._release(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.WAITING
        victim.remote_prefill = False  # its KV is gone: this worker recomputes prompt and output itself
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim)

    def schedule(self) -> SchedulerOutput:
        if self.holds.num_holds:
            self.holds.free_done()
        out = SchedulerOutput(released=self._released)
        self._released = []
        budget = self.cfg.max_num_batched_tokens
        chunk_cap = self.cfg.chunked_prefill_size

        # 1. Running requests, oldest first. (Per-request work here runs for every sequence every step:
        # plain comparisons instead of min() and properties.) Preemption removes requests from the tail
        # of `running`, which ends this loop where the list now ends.
        running = self.running
        bs, lookahead = self.block_size, self.num_lookahead_tokens
        chunks = out.chunks
        for req in running:
            if budget <= 0:
                break
            computed = req.num_computed_tokens
            num_new = len(req.token_ids) - computed
            if num_new > chunk_cap:
                num_new = chunk_cap
            if num_new > budget:
                num_new = budget
            if num_new <= 0:
                continue
            need = -(-(computed + num_new + lookahead) // bs) - len(req.block_ids)  # _blocks_needed, inlined
            if need <= 0:  # the usual decode step: room in the last block
                if num_new == 1:
                    chunk = req.decode_chunk
                    if chunk is None:
                        chunk = req.decode_chunk = ScheduledChunk(req, 1)
                    chunks.append(chunk)
                else:
                    chunks.append(ScheduledChunk(req, num_new))
                budget -= num_new
                continue
            while need > self.pool.num_free:
                victim = running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # req preempted itself: everything after it is gone too
            req.block_ids += self.pool.allocate(need)
            chunks.append(ScheduledChunk(req, num_new))
            budget -= num_new

        # 2. Waiting requests, FIFO; none while this step had to preempt (memory is tight).
        while self.waiting and budget > 0 and self.num_seqs < self.cfg.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            if not self._fits_ever(req):
                self.waiting.popleft()
                req.finish(FinishReason.LENGTH)
                self._release(req)  # holds no blocks yet: drops its decode chunk (no cycle left behind)
                out.rejected.append(req)
                continue
            hits = self._reuse_prefix(req)
            # A remote prefill computes nothing here: it needs blocks for the prompt and the first token.
            num_new = 0 if req.remote_prefill else min(req.num_tokens - req.num_computed_tokens, chunk_cap, budget)
            need = (self._blocks_needed(req, req.num_tokens + 1 - req.num_computed_tokens) if req.remote_prefill
                    else self._blocks_needed(req, num_new))
            if need > self.pool.num_free:
                if hits:  # give the prefix back; try again next step
                    self.pool.free(req.block_ids)
                    req.block_ids = []
                    req.num_computed_tokens = req.num_registered_blocks = 0
                break
            if need:
                req.block_ids += self.pool.allocate(need)
            self.waiting.popleft()
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                self.queue_time_samples.append(req.first_scheduled_time - req.arrival_time)
            if req.remote_prefill:
                req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
                self.waiting_for_kv[req.request_id] = req
                if self.kv_connector is not None:
                    self.kv_connector.blocks_allocated(req)
                continue
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, num_new))
            budget -= num_new
        return out

    def _fits_ever(self, req: Request) -> bool:
        """A request whose prompt alone exceeds the whole cache can never run."""
        return -(-(req.num_tokens + 1) // self.block_size) <= self.pool.num_blocks

    def _reuse_prefix(self, req: Request) -> int:
        """Attach cached blocks for the request's prefix; at least one token is always recomputed."""
        if req.num_computed_tokens or req.block_ids:
            return 0
        hashes = req.block_hashes(self.block_size)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits = self.pool.match_prefix(hashes, max_blocks)
        req.block_ids += hits  # into the list made with the request (empty here): see add()
        req.num_computed_tokens = len(hits) * self.block_size
        req.num_registered_blocks = len(hits)  # cached blocks are published already
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = req.num_computed_tokens
            self.pool.record_lookup(req.num_tokens, req.num_computed_tokens)
        return len(hits)

    # -- after the forward pass ---------------------------------------------------------------
    def advance(self, chunk: ScheduledChunk) -> None:
        """Mark the chunk's tokens computed and publish the request's newly full blocks."""
        req = chunk.request
        req.num_computed_tokens += chunk.num_new_tokens
        if req.num_computed_tokens // self.block_size > req.num_registered_blocks:  # a block just filled
            self._register_full_blocks(req)

    def advance_all(self, chunks: list[ScheduledChunk]) -> None:
        """advance() for every chunk of a step, in one call (this runs for every sequence every step)."""
        bs = self.block_size
        for chunk in chunks:
            req = chunk.request
            n = chunk.num_new_tokens
            computed = req.num_computed_tokens = req.num_computed_tokens + n
            # Only a chunk that reaches a block boundary can fill a block (num_registered_blocks keeps up with
            # every advance), so the usual decode step does not read it: past 256 blocks that int is an object
            # of its own, one more scattered memory read per sequence.
            if computed % bs < n and computed // bs > req.num_registered_blocks:
                self._register_full_blocks(req)

    def _register_full_blocks(self, req: Request) -> None:
        n_full = req.num_computed_tokens // self.block_size
        if n_full > req.num_registered_blocks:
            start = req.num_registered_blocks
            hashes = req.block_hashes(self.block_size)
            self.pool.register_full_blocks(req.block_ids[start:n_full], hashes[start:n_full])
            req.num_registered_blocks = n_full
