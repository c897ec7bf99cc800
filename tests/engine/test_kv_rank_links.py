"""KV links between TP ranks (engine/parallel/kv_plan.py, kv_ranks.py) in one process, on gloo: a decode
rank fed by two prefill ranks (a head each: TP 2 -> 1) and one prefill rank feeding two decode ranks (TP 1 ->
2, the sender slicing its heads) land exactly the heads each rank holds; the transfer is done only when every
link's tokens landed, and a cancel fails it at once."""

from __future__ import annotations

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


@pytest.fixture
def clients():
    """One link client per prefill rank (a process keeps one link per decode endpoint)."""
    cs = [KVLinkClient(timeout_s=10, connect_timeout_s=20) for _ in range(2)]
    yield cs
    for c in cs:
        c.close()


def _endpoint(rank: int, caches) -> RankKVEndpoint:
    return RankKVEndpoint(KVLinkServer("127.0.0.1", 0, timeout_s=10, connect_timeout_s=20), caches, rank, "127.0.0.1")


def _send(client, address, tid, caches, head, n, blocks, start, count):
    sender = client.sender(address)
    for layer, cache in enumerate(caches):
        sender.send_layer(tid, layer, head_view(cache, head, n), blocks, start, count)
    return sender


def test_two_prefill_ranks_feed_one_decode_rank_a_head_each(clients):
    full = _cache(1)
    p_ranks = [[c[:, :, :, r : r + 1].contiguous() for c in full] for r in range(2)]  # each holds one head
    d = _cache(None)
    group = KVRankGroup(_endpoint(0, d))
    try:
        p_blocks, d_blocks, n = [3, 4, 9, 10], [0, 7, 2, 5], 14
        tid = group.new_transfer_id()
        t, addresses = group.expect({0: Expect(tid, "p", [(0, 0, 1), (1, 1, 1)], d_blocks, n, LAYERS, 0)})
        _send(clients[0], addresses[0][0], tid, p_ranks[0], 0, 0, p_blocks, 0, 9)
        sender = _send(clients[1], addresses[0][1], tid, p_ranks[1], 0, 0, p_blocks, 0, n)
        sender.finish(tid).result(20)
        with pytest.raises(TimeoutError):  # rank 0's link still owes tokens 9..13
            t.future.result(0.5)
        _send(clients[0], addresses[0][0], tid, p_ranks[0], 0, 0, p_blocks, 9, n - 9)
        assert t.future.result(20) == n * LAYERS * 2 * HEADS * DIM * 4
        assert torch.equal(_tokens(d, d_blocks, n), _tokens(full, p_blocks, n))
    finally:
        group.close()


def test_one_prefill_rank_feeds_two_decode_ranks_their_heads(clients):
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
            _send(clients[0], addresses[0][0], tid, full, r, 1, p_blocks, 4, n - 4)  # slices head r of P's cache
        for r, t in enumerate(handles):
            t.future.result(20)
            got, want = _tokens(d_ranks[r], d_blocks, n), _tokens(full, p_blocks, n)[..., r : r + 1, :]
            assert torch.equal(got[:, 4:], want[:, 4:])
            assert not got[:, :4].any()  # D's own cached prefix is not sent
    finally:
        for g in groups:
            g.close()


def test_a_cancel_fails_the_transfer_and_later_data_is_dropped(clients):
    d = _cache(None)
    group = KVRankGroup(_endpoint(0, d))
    try:
        t, addresses = group.expect({0: Expect(1, "p", [(0, 0, 0)], [0, 1], 8, LAYERS, 0)})
        t.cancel()
        with pytest.raises(KVTransferError):
            t.future.result(5)
        sender = _send(clients[0], addresses[0][0], 1, _cache(3), 0, 0, [0, 1], 0, 8)
        sender.finish(1).result(20)
        rx = group.local.server.links()["p#p0>d0"]
        assert rx.bytes_dropped == rx.bytes_received > 0
        assert not any(c.any() for c in d)
    finally:
        group.close()


def test_a_broken_link_fails_the_transfer_at_once_and_cancels_its_other_links(clients):
    d = _cache(None)
    group = KVRankGroup(_endpoint(0, d))
    try:
        t, addresses = group.expect({0: Expect(7, "p", [(0, 0, 1), (1, 1, 1)], [0, 1, 2], 10, LAYERS, 0)})
        _send(clients[1], addresses[0][1], 7, _cache(4, heads=1), 0, 0, [0, 1, 2], 0, 4)  # link 1 is in use
        sender = _send(clients[0], addresses[0][0], 7, _cache(5, heads=1), 0, 0, [0, 1, 2], 0, 4)
        rx0 = group.local.server.links()["p#p0>d0"]
        deadline = time.monotonic() + 30
        while rx0.bytes_received == 0:  # joined and sending (a link closed before it joins fails later)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sender.close()  # prefill rank 0 goes away mid-transfer
        with pytest.raises(KVTransferError, match="closed by the prefill side"):
            t.future.result(20)
        links = group.local.server.links()
        assert links["p#p0>d0"].broken and not links["p#p1>d0"].broken
        assert links["p#p1>d0"]._pending == {}  # the healthy link no longer writes into these blocks
        assert group.local.num_pending == 0
    finally:
        group.close()
