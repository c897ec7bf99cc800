"""Delayed free on the prefill worker: a request's blocks that KV is still being sent from stay allocated
(counted as used, never handed out again, never evicted) after the request lets go of them, until the
send is done, however it ends; then exactly those blocks go back to the pool."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from glmserve.engine.block_pool import BlockPool, NoFreeBlocks
from glmserve.engine.config import SchedulerConfig
from glmserve.engine.request import FinishReason, Request
from glmserve.engine.sampled_token import SampledToken
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.scheduler import Scheduler

BS = 4


class Guard:
    """The scheduler's send guard: one pending send per request that asked."""

    def __init__(self, sending=("a",)):
        self.sending = set(sending)
        self.futures: dict[str, Future] = {}

    def blocks_released(self, req):
        if req.request_id not in self.sending:
            return None
        fut = self.futures[req.request_id] = Future()
        return fut


def make(num_blocks=16, budget=64, guard=None):
    pool = BlockPool(num_blocks, BS)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, chunked_prefill_size=64), pool)
    s.send_guard = guard
    return s, pool


def req(rid, n, first=1):
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=1, ignore_eos=True))


def prefill(s, r):
    """Schedule until r's prompt is computed and its first token sampled."""
    s.add(r)
    while not r.output_token_ids:
        for c in s.schedule().chunks:
            last = c.completes_sequence
            s.advance(c)
            if last:
                c.request.append_token(SampledToken(7, None, None))


def settle(fut: Future, outcome: str) -> None:
    if outcome == "sent":
        fut.set_result(None)
    elif outcome == "failed":
        fut.set_exception(RuntimeError("KV link broke"))
    else:
        assert fut.cancel()


@pytest.mark.parametrize("outcome", ["sent", "failed", "cancelled"])
def test_finished_request_keeps_its_blocks_until_the_send_is_done(outcome):
    guard = Guard()
    s, pool = make(guard=guard)
    a = req("a", 4 * BS)  # 4 full blocks
    prefill(s, a)
    held = list(a.block_ids)
    a.finish(FinishReason.LENGTH)
    s.finish(a)
    assert a.block_ids == [] and pool.num_used == len(held) == 4 and s.holds.num_holds == 1

    # Not reusable: everything else can be allocated, none of the held blocks comes out.
    s.schedule()
    others = pool.allocate(pool.num_free)
    assert not set(others) & set(held)
    with pytest.raises(NoFreeBlocks):
        pool.allocate(1)
    pool.free(others)
    # Not evicted: the full blocks are still findable by the prefix cache while held.
    assert pool.match_prefix(a.block_hashes(BS), 4) == held[:4]
    pool.free(held[:4])

    settle(guard.futures["a"], outcome)
    assert pool.num_used == len(held)  # given back on the engine thread, at the next schedule()
    s.schedule()
    assert pool.num_used == 0 and pool.num_free == pool.num_blocks and s.holds.num_holds == 0


def test_aborted_and_preempted_requests_hold_too_and_only_requests_that_sent():
    guard = Guard(sending=("a", "p"))
    s, pool = make(num_blocks=12, guard=guard)
    b = req("b", 2 * BS)  # sent nothing: its blocks go back at once
    prefill(s, b)
    s.finish(b, FinishReason.ABORT)
    assert pool.num_used == 0 and "b" not in guard.futures

    a = req("a", 2 * BS)
    s.add(a)
    s.schedule()
    a_blocks = list(a.block_ids)
    s.finish(a, FinishReason.ABORT)  # mid-prefill
    assert pool.num_used == len(a_blocks) and s.holds.num_holds == 1

    # p is preempted: its next decode token needs a block and none is free.
    p = req("p", 3 * BS, first=100)  # no prefix shared with a
    prefill(s, p)
    p_blocks = list(p.block_ids)
    filler = pool.allocate(pool.num_free)
    out = s.schedule()
    assert out.preempted == [p] and p.block_ids == [] and s.holds.num_holds == 2
    assert pool.num_free == 0 and pool.num_used == len(a_blocks) + len(p_blocks) + len(filler)  # p's are held
    pool.free(filler)
    guard.futures["p"].set_result(None)
    guard.futures["a"].set_exception(RuntimeError("decode peer gone"))
    s.schedule()  # frees both holds, then re-admits p (recomputed) into fresh blocks
    assert s.holds.num_holds == 0 and pool.num_used == len(p.block_ids) > 0
    s.finish(p, FinishReason.ABORT)
    guard.futures["p"].set_result(None)  # p's recompute sent again: held again until that is done
    s.schedule()
    assert pool.num_used == 0


def test_blocks_are_freed_when_the_send_is_already_done():
    guard = Guard()
    s, pool = make(guard=guard)
    a = req("a", BS)
    prefill(s, a)
    guard.blocks_released = lambda r: _done()
    s.finish(a, FinishReason.ABORT)
    s.schedule()
    assert pool.num_used == 0 and s.holds.num_holds == 0


def _done() -> Future:
    fut: Future = Future()
    fut.set_result(None)
    return fut
