"""KV links between TP ranks (engine/parallel/kv_plan.py, kv_ranks.py) on gloo, the decode ranks in this process
and the prefill ranks' link clients in a child process (as real workers; gloo links are not made for both ends
in one process): a decode rank fed by two prefill ranks (a head each: TP 2 -> 1) and one prefill rank feeding
two decode ranks (TP 1 -> 2, the sender slicing its heads) land exactly the heads each rank holds; the
transfer is done only when every link's tokens landed; a cancel, or one broken link, fails it at once."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from glmserve.engine.kv_link import KVTransferError
from glmserve.engine.kv_receiver import KVLinkServer
from glmserve.engine.kv_sender import KVLinkClient
from glmserve.engine.kv_wire import token_slots
from glmserve.engine.parallel.kv_plan import head_view
from glmserve.engine.parallel.kv_ranks import Expect, KVRankGroup, RankKVEndpoint

LAYERS, BLOCKS, BS, HEADS, DIM = 2, 16, 4, 2, 8


def _cache(seed: int | None, heads: int = HEADS) -> list[torch.Tensor]:
    shape = (BLOCKS, 2, BS, heads, DIM)
    if seed is None:
        return [torch.zeros(shape) for _ in range(LAYERS)]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(LAYERS)]


def _tokens(caches, blocks, n):
    """[layers, tokens, 2, heads, dim] of tokens 0..n-1 held in these blocks."""
    blk, off = token_slots(blocks, BS, 0, n, torch.device("cpu"))
    return torch.stack([c[blk, :, off] for c in caches])


def _p_agent(conn) -> None:
    """The prefill side: one link client per prefill rank, caches rebuilt from their seeds."""
    clients = [KVLinkClient(timeout_s=10, connect_timeout_s=20) for _ in range(2)]
    senders = {}
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "send":  # (rank, address, tid, seed, heads, first head, count, blocks, start, tokens)
                rank, address, tid, seed, heads, head, n, blocks, start, count = args
                senders[rank] = sender = clients[rank].sender(address)
                for layer, cache in enumerate(_cache(seed, heads)):
                    sender.send_layer(tid, layer, head_view(cache, head, n), blocks, start, count)
                conn.send(None)
            elif cmd == "finish":
                conn.send(senders[args[0]].finish(args[1]).result(20))
            elif cmd == "close":
                senders[args[0]].close()
                conn.send(None)
            else:
                return
        except Exception as exc:  # noqa: BLE001 - shown by the test
            conn.send(exc)


class PSide:
    def __init__(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_p_agent, args=(child,), daemon=True)
        self.proc.start()

    def __call__(self, *cmd):
        self.conn.send(cmd)
        assert self.conn.poll(60), f"prefill agent did not answer {cmd[0]}"
        out = self.conn.recv()
        if isinstance(out, Exception):
            raise out
        return out


@pytest.fixture(scope="module")
def p_side():
    p = PSide()
    yield p
    p.conn.send(("stop",))
    p.proc.join(10)
    p.proc.kill()


def _endpoint(rank: int, caches) -> RankKVEndpoint:
    return RankKVEndpoint(KVLinkServer("127.0.0.1", 0, timeout_s=10, connect_timeout_s=20), caches, rank, "127.0.0.1")


def test_two_prefill_ranks_feed_one_decode_rank_a_head_each(p_side):
    p_ranks = [_cache(10 + r, heads=1) for r in range(2)]  # prefill rank r holds KV head r
    d = _cache(None)
    group = KVRankGroup(_endpoint(0, d))
    try:
        p_blocks, d_blocks, n = [3, 4, 9, 10], [0, 7, 2, 5], 14
        tid = group.new_transfer_id()
        t, addresses = group.expect({0: Expect(tid, "p", [(0, 0, 1), (1, 1, 1)], d_blocks, n, LAYERS, 0)})
        p_side("send", 0, addresses[0][0], tid, 10, 1, 0, 0, p_blocks, 0, 9)
        p_side("send", 1, addresses[0][1], tid, 11, 1, 0, 0, p_blocks, 0, n)
        p_side("finish", 1, tid)
        with pytest.raises(TimeoutError):  # rank 0's link still owes tokens 9..13
            t.future.result(0.5)
        p_side("send", 0, addresses[0][0], tid, 10, 1, 0, 0, p_blocks, 9, n - 9)
        assert t.future.result(20) == n * LAYERS * 2 * HEADS * DIM * 4
        want = torch.cat([_tokens(p, p_blocks, n) for p in p_ranks], dim=3)
        assert torch.equal(_tokens(d, d_blocks, n), want)
    finally:
        group.close()


def test_one_prefill_rank_feeds_two_decode_ranks_their_heads(p_side):
    full = _cache(2)
    d_ranks = [_cache(None, heads=1) for _ in range(2)]
    groups = [KVRankGroup(_endpoint(r, d_ranks[r])) for r in range(2)]
    try:
        p_blocks, d_blocks, n = [1, 2, 3, 4], [8, 6, 4, 2], 13
        tid = 5
        handles = []
        for r, g in enumerate(groups):  # each decode rank's part (as the leader's rounds would register them)
            t, addresses = g.expect({0: Expect(tid, "p", [(0, 0, 1)], d_blocks, n, LAYERS, 4)})
            handles.append(t)
            p_side("send", 0, addresses[0][0], tid, 2, HEADS, r, 1, p_blocks, 4, n - 4)  # head r of P's cache
        for r, t in enumerate(handles):
            t.future.result(20)
            got, want = _tokens(d_ranks[r], d_blocks, n), _tokens(full, p_blocks, n)[..., r : r + 1, :]
            assert torch.equal(got[:, 4:], want[:, 4:])
            assert not got[:, :4].any()  # D's own cached prefix is not sent
    finally:
        for g in groups:
            g.close()


def test_a_cancel_fails_the_transfer_and_later_data_is_dropped(p_side):
    d = _cache(None)
    group = KVRankGroup(_endpoint(0, d))
    try:
        t, addresses = group.expect({0: Expect(1, "p", [(0, 0, 0)], [0, 1], 8, LAYERS, 0)})
        t.cancel()
        with pytest.raises(KVTransferError):
            t.future.result(5)
        p_side("send", 0, addresses[0][0], 1, 3, HEADS, 0, 0, [0, 1], 0, 8)
        p_side("finish", 0, 1)
        rx = group.local.server.links()["p#p0>d0"]
        assert rx.bytes_dropped == rx.bytes_received > 0
        assert not any(c.any() for c in d)
    finally:
        group.close()


def test_a_broken_link_fails_the_transfer_at_once_and_cancels_its_other_links(p_side):
    d = _cache(None)
    group = KVRankGroup(_endpoint(0, d))
    try:
        t, addresses = group.expect({0: Expect(7, "p", [(0, 0, 1), (1, 1, 1)], [0, 1, 2], 10, LAYERS, 0)})
        p_side("send", 1, addresses[0][1], 7, 4, 1, 0, 0, [0, 1, 2], 0, 4)  # link 1 is in use
        p_side("send", 0, addresses[0][0], 7, 5, 1, 0, 0, [0, 1, 2], 0, 4)
        rx0 = group.local.server.links()["p#p0>d0"]
        deadline = time.monotonic() + 30
        while rx0.bytes_received == 0:  # joined and sending (a link closed before it joins fails later)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        p_side("close", 0)  # prefill rank 0 goes away mid-transfer
        with pytest.raises(KVTransferError, match="closed by the prefill side"):
            t.future.result(20)
        links = group.local.server.links()
        assert links["p#p0>d0"].broken and not links["p#p1>d0"].broken
        assert links["p#p1>d0"]._pending == {}  # the healthy link no longer writes into these blocks
        assert group.local.num_pending == 0
    finally:
        group.close()
