"""KV link between a prefill worker P (a real child process) and a decode worker D (this process), on gloo.

P's cache is random from a seed, so D can rebuild the exact values P held. P overwrites every token
right after sending it, which would show up here if send_layer did not copy before returning.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass

import pytest
import torch

from glmserve.engine.kv_link import KVLinkError, KVTransferCancelled, LinkEvent, prometheus_observer
from glmserve.engine.kv_receiver import KVLinkServer, _Coverage
from glmserve.engine.kv_sender import KVLinkClient
from glmserve.engine.kv_wire import KV, Header, block_size_of, gather_tokens, scatter_tokens, token_slots
from glmserve.metrics import ServiceMetrics

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Layout:
    kind: str
    num_layers: int = 3
    num_blocks: int = 48
    block_size: int = 4
    heads: int = 2
    dim: int = 8
    latent: int = 24
    dtype: torch.dtype = torch.bfloat16

    def caches(self, seed: int | None) -> list[torch.Tensor]:
        shape = ((self.num_blocks, 2, self.block_size, self.heads, self.dim) if self.kind == "gqa"
                 else (self.num_blocks, self.block_size, self.latent))
        if seed is None:
            return [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(shape, generator=g).to(self.dtype) for _ in range(self.num_layers)]

    def token_bytes(self) -> int:
        per = 2 * self.heads * self.dim if self.kind == "gqa" else self.latent
        return per * self.dtype.itemsize


GQA, MLA = Layout("gqa"), Layout("mla", block_size=8)


@dataclass(frozen=True)
class Plan:
    """One transfer: a prefix-cache hit of `prefix` tokens, then chunked-prefill chunks."""

    tid: int
    prefix: int
    chunks: tuple[int, ...]
    p_blocks: tuple[int, ...]
    d_blocks: tuple[int, ...]
    p_cancel: bool = False  # P cancels after the first step
    zero_copy: bool = False  # P sends whole blocks straight from its cache (copy=False) and keeps them intact

    @property
    def num_tokens(self) -> int:
        return self.prefix + sum(self.chunks)


def make_plans(layout: Layout, rx, specs, seed: int) -> list[Plan]:
    """Random, disjoint block ids on both sides (D's cache is checked to stay zero elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    p_free = torch.randperm(layout.num_blocks, generator=g).tolist()
    d_free = torch.randperm(layout.num_blocks, generator=g).tolist()
    plans = []
    for prefix, chunks, p_cancel in specs:
        n = -(-(prefix + sum(chunks)) // layout.block_size)
        pb, db = p_free[:n], d_free[:n]
        del p_free[:n], d_free[:n]
        plans.append(Plan(rx.new_transfer_id(), prefix, tuple(chunks), tuple(pb), tuple(db), p_cancel))
    return plans


def _overwrite(cache: torch.Tensor, blocks, start: int, count: int) -> None:
    blk, off = token_slots(blocks, block_size_of(cache), start, count, CPU)
    scatter_tokens(cache, blk, off, torch.full_like(gather_tokens(cache, blk, off), -7.0))


def _run_plans(client: KVLinkClient, address, layout: Layout, seed: int, plans: list[Plan], hang: bool):
    """What P's model runner does: prefix hits, then steps whose on_layer_done sends every request's chunk."""
    caches = layout.caches(seed)
    tx = client.sender(address)
    for p in plans:
        tx.send_prefix(p.tid, caches, p.p_blocks, p.prefix)
        for cache in caches:
            _overwrite(cache, p.p_blocks, 0, p.prefix)
    done = {p.tid: p.prefix for p in plans}
    for step in range(max(len(p.chunks) for p in plans)):
        for layer, cache in enumerate(caches):
            for p in plans:
                if step < len(p.chunks):  # after a cancel these calls must be ignored
                    tx.send_layer(p.tid, layer, cache, p.p_blocks, done[p.tid], p.chunks[step], copy=not p.zero_copy)
                    if not p.zero_copy:  # the data was copied out: P may reuse the slots at once
                        _overwrite(cache, p.p_blocks, done[p.tid], p.chunks[step])
        for p in plans:
            done[p.tid] += p.chunks[step] if step < len(p.chunks) else 0
            if p.p_cancel and step == 0:
                tx.cancel(p.tid)
        if hang:
            return {}, tx
    futures = {p.tid: tx.finish(p.tid) for p in plans}
    out = {}
    for tid, f in futures.items():
        out[tid] = "cancelled" if f.cancelled() else f.result(20)
    return out, tx


def _p_agent(conn, timeout_s: float) -> None:
    """Prefill workers (one KVLinkClient per worker name) in one process, driven by the test over a pipe."""
    workers: dict[str, tuple[KVLinkClient, list[LinkEvent]]] = {}
    while True:
        cmd = conn.recv()
        if cmd[0] == "exit":
            for client, _ in workers.values():
                client.close()
            return
        _, worker, address, layout, seed, plans, hang = cmd
        if worker not in workers:
            events: list[LinkEvent] = []
            workers[worker] = (KVLinkClient(timeout_s=timeout_s, observer=events.append), events)
        client, events = workers[worker]
        results, tx = _run_plans(client, address, layout, seed, plans, hang)
        sent = sum(e.value for e in events if e.kind == "bytes" and e.direction == "send")
        conn.send((results, tx.bytes_sent, sent, tx.backend))
        if hang:
            conn.recv()  # stays alive, heartbeating, until the test kills it


def _start_p(timeout_s: float = 10.0):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_p_agent, args=(child, timeout_s), daemon=True)
    proc.start()
    return proc, parent


def _d_tokens(caches, blocks, n, layer):
    return gather_tokens(caches[layer], *token_slots(blocks, block_size_of(caches[layer]), 0, n, CPU))


def _check_equal(layout: Layout, seed: int, d_caches, plan: Plan) -> None:
    p_caches = layout.caches(seed)
    for layer in range(layout.num_layers):
        want = _d_tokens(p_caches, plan.p_blocks, plan.num_tokens, layer)
        got = _d_tokens(d_caches, plan.d_blocks, plan.num_tokens, layer)
        assert torch.equal(got, want), f"transfer {plan.tid} layer {layer} differs"


def _zero_outside(layout: Layout, d_caches, plans: list[Plan]) -> None:
    """Every D slot not written by a completed transfer is still zero."""
    for cache in d_caches:
        mask = torch.ones(cache.shape[0], layout.block_size, dtype=torch.bool)
        for p in plans:
            blk, off = token_slots(p.d_blocks, layout.block_size, 0, p.num_tokens, CPU)
            mask[blk, off] = False
        flat = cache if cache.dim() == 3 else cache.transpose(1, 2)
        assert not flat[mask].any(), "data landed outside the expected slots"


def _wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


# ------------------------------------------------------------------------------ in-process unit tests


def test_header_roundtrip_and_corruption():
    h = Header(KV, 7, 3, 128, 64, 64 * 576, torch.bfloat16)
    assert Header.decode(h.encode()) == h and h.nbytes == 64 * 576 * 2
    bad = h.encode()
    bad[0] = 1
    with pytest.raises(ValueError):
        Header.decode(bad)


@pytest.mark.parametrize("layout", [GQA, MLA], ids=["gqa", "mla"])
def test_gather_scatter_across_block_sizes(layout):
    src = layout.caches(1)[0]
    # D uses another block size: token granularity must not care.
    other = Layout(layout.kind, block_size=layout.block_size * 2, num_blocks=layout.num_blocks)
    dst = other.caches(None)[0]
    n = 2 * layout.block_size + 4  # tokens 3..n+2 span both of D's blocks
    vals = gather_tokens(src, *token_slots([5, 2, 9, 4], layout.block_size, 3, n, CPU))
    scatter_tokens(dst, *token_slots([1, 6], other.block_size, 3, n, CPU), vals)
    back = gather_tokens(dst, *token_slots([1, 6], other.block_size, 3, n, CPU))
    assert torch.equal(back, vals) and vals.shape[0] == n
    assert int((dst != 0).flatten(1).any(1).sum()) == 2  # only blocks 1 and 6 touched
    with pytest.raises(ValueError):
        token_slots([1], layout.block_size, 0, layout.block_size + 1, CPU)


def test_coverage_rejects_overlap_and_out_of_range():
    c = _Coverage(2, 10)
    c.add(0, 0, 4)
    c.add(0, 4, 6)
    c.add(1, 5, 5)
    assert c.remaining == 5
    for args in [(1, 7, 2), (2, 0, 1), (1, 0, 11)]:
        with pytest.raises(ValueError):
            c.add(*args)


# ------------------------------------------------------------------------------ two real processes


def test_chunked_interleaved_transfers_gqa_mla_and_cancel():
    events: list[LinkEvent] = []
    metrics = ServiceMetrics("decode", "tiny")
    prom = prometheus_observer(metrics)
    server = KVLinkServer("127.0.0.1", 0, timeout_s=10.0, observer=lambda e: (events.append(e), prom(e)))
    proc, conn = _start_p()
    try:
        for seed, layout in [(11, GQA), (12, MLA)]:
            rx = server.receiver(f"p-{layout.kind}")  # two prefill workers (both inside one child process)
            d_caches = layout.caches(None)
            # (prefix, chunks, P cancels): 21, 13 and 13 tokens; one P-side cancel; one D-side cancel.
            specs = [(5, (7, 6, 3), False), (0, (4, 9), False), (8, (5,), False), (4, (6, 6), True), (0, (9, 3), False)]
            plans = make_plans(layout, rx, specs, seed)
            handles = {p.tid: rx.expect(p.tid, d_caches, list(p.d_blocks), p.num_tokens, layout.num_layers)
                       for p in plans}
            d_cancelled = plans[-1]
            handles[d_cancelled.tid].cancel()  # before P sends: all of its data must be dropped
            conn.send(("run", f"p-{layout.kind}", rx.address, layout, seed, plans, False))
            results, p_bytes, p_observed, backend = conn.recv()
            ok = [p for p in plans if not p.p_cancel and p is not d_cancelled]
            for p in ok:
                expected = layout.num_layers * p.num_tokens * layout.token_bytes()
                assert handles[p.tid].wait(10) == expected == results[p.tid]
                _check_equal(layout, seed, d_caches, p)
            with pytest.raises(KVTransferCancelled, match="prefill side"):
                handles[plans[3].tid].wait(10)
            with pytest.raises(KVTransferCancelled, match="decode side"):
                handles[d_cancelled.tid].wait(0)
            assert results[plans[3].tid] == "cancelled"
            dropped = layout.num_layers * d_cancelled.num_tokens * layout.token_bytes()
            assert _wait_for(lambda: rx.bytes_received == p_bytes), (rx.bytes_received, p_bytes)
            assert rx.bytes_dropped == dropped and p_observed == p_bytes and backend == rx.backend == "gloo"
            _zero_outside(layout, d_caches, ok + [plans[3]])  # the D-cancelled blocks stay zero

            # The stream is still in step after both cancels: one more transfer on the same link.
            nxt = make_plans(layout, rx, [(3, (10,), False)], seed + 100)[0]
            fresh = layout.caches(None)
            h = rx.expect(nxt.tid, fresh, nxt.d_blocks, nxt.num_tokens, layout.num_layers)
            conn.send(("run", f"p-{layout.kind}", rx.address, layout, seed, [nxt], False))
            results, p_bytes, _, _ = conn.recv()
            assert h.wait(10) == results[nxt.tid] > 0
            _check_equal(layout, seed, fresh, nxt)
            assert not rx.broken
        recv_events = sum(e.value for e in events if e.kind == "bytes")
        label = {"role": "decode", "model_name": "tiny", "link": "p-mla", "direction": "recv"}
        prom_mla = metrics.registry.get_sample_value("glmserve:kv_transfer_bytes_total", label)
        assert recv_events == server.receiver("p-gqa").bytes_received + server.receiver("p-mla").bytes_received
        assert prom_mla == server.receiver("p-mla").bytes_received
        assert sum(1 for e in events if e.kind == "latency") == 8  # 4 completed transfers per link
        conn.send(("exit",))
        proc.join(10)
        assert proc.exitcode == 0
        # P closed its links cleanly: D sees that, so the next request would make a new epoch.
        for peer in ("p-gqa", "p-mla"):
            assert _wait_for(lambda: server.links()[peer].broken)
            assert "closed by the prefill side" in str(server.links()[peer].error)
    finally:
        proc.kill()
        server.close()


@pytest.mark.parametrize("layout", [GQA, MLA], ids=["gqa", "mla"])
def test_whole_blocks_land_in_place_or_convert(layout):
    """Whole blocks on the wire: into consecutive D blocks of the same size they are received in place,
    into scattered ones copied block by block, into D blocks of another size converted to tokens; P sends
    them from its cache (copy=False) or from a copy. Chunks start mid-block, so heads and tails go as tokens."""
    server = KVLinkServer("127.0.0.1", 0, timeout_s=10.0)
    proc, conn = _start_p()
    try:
        rx = server.receiver("p")
        bs = layout.block_size
        bigger = Layout(layout.kind, block_size=2 * bs, num_blocks=layout.num_blocks)
        chunks = (3 * bs + 1, 2 * bs + 3, bs)  # 3 whole blocks + 1; a head, a block, a tail; one block
        n_p = -(-sum(chunks) // bs)
        cases = [  # (D layout, D blocks, P blocks, zero copy)
            (layout, tuple(range(10, 10 + n_p)), tuple(range(20, 20 + n_p)), True),  # in place, from P's cache
            (layout, tuple(range(30, 30 + n_p))[::-1], tuple(range(0, n_p)), False),  # scattered D blocks
            (bigger, tuple(range(2, 2 + -(-sum(chunks) // (2 * bs)))), tuple(range(20, 20 + n_p)), True),
        ]
        for i, (d_layout, d_blocks, p_blocks, zero_copy) in enumerate(cases):
            in_place = rx.bytes_in_place
            d_caches = d_layout.caches(None)
            plan = Plan(rx.new_transfer_id(), 0, chunks, p_blocks, d_blocks, zero_copy=zero_copy)
            h = rx.expect(plan.tid, d_caches, list(d_blocks), plan.num_tokens, layout.num_layers)
            conn.send(("run", "p", rx.address, layout, 5, [plan], False))
            results, _, _, _ = conn.recv()
            assert h.wait(10) == results[plan.tid] == layout.num_layers * plan.num_tokens * layout.token_bytes()
            _check_equal(layout, 5, d_caches, plan)
            _zero_outside(d_layout, d_caches, [plan])
            starts = [sum(chunks[:j]) for j in range(len(chunks))]  # blocks lying wholly inside one chunk:
            n_whole = sum(1 for s0, c in zip(starts, chunks) for k in range(n_p) if s0 <= k * bs and (k + 1) * bs <= s0 + c)
            whole = layout.num_layers * n_whole * bs * layout.token_bytes()
            # Scattered D blocks: only single-block messages land in place; another block size: none.
            landed = rx.bytes_in_place - in_place
            assert landed == whole if i == 0 else (landed < whole if i == 1 else landed == 0)
        assert not rx.broken and rx.bytes_dropped == 0
        conn.send(("exit",))
        proc.join(10)
    finally:
        proc.kill()
        server.close()


def test_dead_prefill_fails_pending_transfer_and_fresh_link_works():
    server = KVLinkServer("127.0.0.1", 0, timeout_s=10.0)
    (dying, dconn), (other, oconn), (fresh, fconn) = _start_p(), _start_p(), _start_p()
    layout = GQA
    try:
        # A second link (other P) stays up through everything.
        rx_b = server.receiver("pb")
        pb = make_plans(layout, rx_b, [(0, (6,), False)], 1)
        caches_b = layout.caches(None)
        hb = [rx_b.expect(p.tid, caches_b, p.d_blocks, p.num_tokens, layout.num_layers) for p in pb]
        oconn.send(("run", "pb", rx_b.address, layout, 1, pb, False))
        assert hb[0].wait(20) > 0 and oconn.recv()[0][pb[0].tid] > 0

        rx_a = server.receiver("pa")
        pa = make_plans(layout, rx_a, [(4, (8, 8, 8), False)], 2)
        d_caches = layout.caches(None)
        ha = rx_a.expect(pa[0].tid, d_caches, pa[0].d_blocks, pa[0].num_tokens, layout.num_layers)
        dconn.send(("run", "pa", rx_a.address, layout, 2, pa, True))  # sends the prefix and one chunk, then hangs
        dconn.recv()
        assert _wait_for(lambda: rx_a.bytes_received > 0) and not ha.done()
        time.sleep(0.3)
        assert not ha.done()  # heartbeats keep the idle link alive
        os.kill(dying.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(KVLinkError):
            ha.wait(5)
        assert time.monotonic() - t0 < 3.0  # found by the closed socket, well before the 10 s timeout
        assert rx_a.broken and not rx_b.broken

        # Other link unaffected.
        pb2 = make_plans(layout, rx_b, [(2, (5,), False)], 3)
        h2 = rx_b.expect(pb2[0].tid, caches_b, pb2[0].d_blocks, pb2[0].num_tokens, layout.num_layers)
        oconn.send(("run", "pb", rx_b.address, layout, 3, pb2, False))
        assert h2.wait(10) > 0 and oconn.recv()[0][pb2[0].tid] == h2.wait(0)
        _check_equal(layout, 3, caches_b, pb2[0])

        # A restarted P for the same peer gets a new epoch of the link.
        rx_a2 = server.receiver("pa")
        assert rx_a2 is not rx_a and rx_a2.address.name != rx_a.address.name
        pa2 = make_plans(layout, rx_a2, [(4, (8, 9), False)], 4)
        d2 = layout.caches(None)
        h3 = rx_a2.expect(pa2[0].tid, d2, pa2[0].d_blocks, pa2[0].num_tokens, layout.num_layers)
        fconn.send(("run", "pa", rx_a2.address, layout, 4, pa2, False))
        assert h3.wait(10) == fconn.recv()[0][pa2[0].tid]
        _check_equal(layout, 4, d2, pa2[0])
    finally:
        for p in (dying, other, fresh):
            p.kill()
        server.close()


def test_stalled_prefill_times_out():
    """A P that stops (no heartbeat, socket still open) fails D's transfer after the link timeout."""
    # The gloo rendezvous runs under the connect timeout, not this one: a spawned P in a busy full suite
    # can take longer than the stall timeout to join.
    timeout_s = 3.0
    server = KVLinkServer("127.0.0.1", 0, timeout_s=timeout_s)
    proc, conn = _start_p(timeout_s=timeout_s)
    try:
        rx = server.receiver("p")
        plans = make_plans(MLA, rx, [(0, (8, 8), False)], 5)
        h = rx.expect(plans[0].tid, MLA.caches(None), plans[0].d_blocks, plans[0].num_tokens, MLA.num_layers)
        conn.send(("run", "p", rx.address, MLA, 5, plans, True))
        conn.recv()
        assert _wait_for(lambda: rx.bytes_received > 0, timeout=30)  # joined and sending (slow under load)
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(KVLinkError, match="[Tt]imed out|timeout"):
            h.wait(3 * timeout_s)
        # the last heartbeat came <= 0.5 s before the stop
        assert timeout_s - 1.0 < time.monotonic() - t0 < timeout_s + 3.0 and rx.broken
    finally:
        proc.kill()
        server.close()
