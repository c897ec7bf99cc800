"""Worker choice without a network: prefix affinity for prefill, least loaded for decode, health."""

import asyncio
import time

from glmserve.metrics import ServiceMetrics
from glmserve.prefix_hash import chain_hashes
from glmserve.protos import worker_pb2 as pb
from glmserve.router.discovery import StaticDiscovery
from glmserve.router.worker_pool import Worker, WorkerPool


def make_pool(policy="prefix-affinity"):
    pool = WorkerPool(StaticDiscovery([], []), ServiceMetrics("router", "m"), policy=policy, affinity_slack_tokens=100)
    return pool


def add(pool, role, address, **load):
    w = Worker(address, role, channel=None, stub=None, healthy=True, load=pb.LoadReport(block_size=4, **load))
    pool.workers[(role, address)] = w
    return w


def test_prefill_goes_where_the_prefix_is_cached():
    pool = make_pool()
    pool.block_size = 4
    prompt = list(range(40))
    a = add(pool, "prefill", "a", queued_tokens=50)
    b = add(pool, "prefill", "b", queued_tokens=0)
    a.prefix.apply(1, 5, True, chain_hashes(prompt, 4)[:5], [], capacity=100)
    assert pool.pick_prefill(prompt) is a
    # Unless that worker is overloaded compared with the least loaded one.
    a.load.queued_tokens = 10_000
    assert pool.pick_prefill(prompt) is b


def test_prefill_without_any_hit_is_least_queued_and_remembers_the_prefix():
    pool = make_pool()
    pool.block_size = 4
    prompt = list(range(16))
    add(pool, "prefill", "a", queued_tokens=30)
    b = add(pool, "prefill", "b", queued_tokens=5)
    assert pool.pick_prefill(prompt) is b
    # The next request with the same prefix follows it there, before the next load poll.
    b.load.queued_tokens = 60
    assert pool.pick_prefill(prompt) is b


def test_decode_prefers_free_kv_then_fewer_requests_and_skips_unhealthy():
    pool = make_pool()
    a = add(pool, "decode", "a", free_blocks=10, total_blocks=100, running_requests=0)
    b = add(pool, "decode", "b", free_blocks=50, total_blocks=100, running_requests=9)
    assert pool.pick_decode() is b
    # Within the same 10% of KV usage, requests in flight decide, so a burst spreads over both.
    a.load.free_blocks, b.load.free_blocks, b.load.running_requests = 98, 99, 0
    first = pool.pick_decode()
    first.inflight += 1
    assert pool.pick_decode() is not first
    pool.mark_unhealthy(b, "stream failed")
    assert pool.pick_decode() is a
    assert pool.pick_decode(exclude={"a"}) is None


def test_round_robin_cycles():
    pool = make_pool("round-robin")
    add(pool, "decode", "a")
    add(pool, "decode", "b")
    assert {pool.pick_decode().address for _ in range(4)} == {"a", "b"}


def test_unreachable_worker_is_marked_unhealthy_by_the_poll():
    pool = WorkerPool(StaticDiscovery(["127.0.0.1:1"], []), ServiceMetrics("router", "m"), poll_interval=0.2)

    async def run():
        await pool.poll()
        healthy = pool.healthy("prefill")
        for w in pool.workers.values():
            await w.channel.close()
        return healthy

    assert asyncio.run(run()) == [] and len(pool.workers) == 1


class _FlakyStub:
    """GetLoad fails with the given codes in turn, the last one from then on (None = answers with a
    serving load report)."""

    def __init__(self, codes):
        self.codes = list(codes)

    async def GetLoad(self, request, timeout=None):
        import grpc

        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        if code is None:
            return pb.LoadReport(state=pb.SERVING_STATE_SERVING, block_size=4)
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "test")


def test_a_slow_poll_does_not_drop_a_busy_worker_but_repeated_misses_and_refusals_do():
    import grpc

    pool = make_pool()
    slow = grpc.StatusCode.DEADLINE_EXCEEDED
    w = Worker("a", "decode", channel=None, stub=_FlakyStub([None, slow, slow, None, slow, slow, slow]))
    gone = Worker("b", "decode", channel=None, stub=_FlakyStub([None, grpc.StatusCode.UNAVAILABLE]))

    async def polls(worker, n):
        states = []
        for _ in range(n):
            await pool._poll_one(worker)
            states.append(worker.healthy)
        return states

    assert asyncio.run(polls(w, 7)) == [True, True, True, True, True, True, False]
    assert asyncio.run(polls(gone, 2)) == [True, False]


def test_a_request_waits_for_a_worker_that_rejoins_on_a_later_poll():
    import grpc

    pool = WorkerPool(StaticDiscovery([], ["a", "b"]), ServiceMetrics("router", "m"))
    back = pool.workers[("decode", "a")] = Worker("a", "decode", channel=None,
                                                 stub=_FlakyStub([grpc.StatusCode.UNAVAILABLE, None]))
    pool.workers[("decode", "b")] = Worker("b", "decode", channel=None,
                                           stub=_FlakyStub([grpc.StatusCode.UNAVAILABLE]))

    async def run():
        found = await pool.wait_for(pool.pick_decode, timeout=5)
        start = time.monotonic()
        missing = await pool.wait_for(lambda: pool.pick_decode(exclude={"a"}), timeout=0.6)
        return found, missing, time.monotonic() - start

    found, missing, waited = asyncio.run(run())
    assert found is back  # unhealthy on the first re-poll, serving on the second
    assert missing is None and 0.5 < waited < 3  # gives up after its timeout, not before


def test_decode_prefers_the_worker_holding_the_prefix_while_its_load_allows():
    pool = make_pool()
    pool.block_size = 4
    prompt = list(range(40))
    hashes = pool.prompt_hashes(prompt)
    a = add(pool, "decode", "a", free_blocks=80, total_blocks=100, running_requests=3)
    b = add(pool, "decode", "b", free_blocks=90, total_blocks=100, running_requests=1)
    a.prefix.apply(1, 8, True, hashes[:8], [], capacity=100)
    assert pool.pick_decode(hashes=hashes) is a
    # Much fuller than the least loaded worker: the prefix no longer wins.
    a.load.free_blocks = 40
    assert pool.pick_decode(hashes=hashes) is b
    # Evicted on the worker (an event says so): no affinity left either.
    a.load.free_blocks = 80
    a.prefix.apply(1, 9, False, [], hashes[:1], capacity=100)
    assert a.prefix.matched_blocks(hashes) == 0
    assert pool.pick_decode(hashes=hashes) is b


def test_prefix_index_follows_deltas_and_stays_bounded():
    from glmserve.router.prefix_index import PrefixIndex

    index = PrefixIndex()
    index.apply(7, 3, True, [1, 2, 3], [], capacity=10)
    index.apply(7, 5, False, [4], [2], capacity=10)
    assert index.hashes == {1, 3, 4} and (index.epoch, index.seq) == (7, 5)
    index.apply(7, 9, True, [9], [], capacity=10)  # a snapshot replaces everything
    assert index.hashes == {9}
    index.apply(7, 10, False, list(range(100, 120)), [], capacity=10)  # more than the worker can hold
    assert len(index) == 0 and index.epoch == 0  # dropped; the next poll asks for a snapshot
