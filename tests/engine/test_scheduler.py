"""Scheduler behaviour on its own (no model): budgets, chunking, prefix reuse, preemption."""

from glmserve.engine.block_pool import BlockPool
from glmserve.engine.config import SchedulerConfig
from glmserve.engine.request import Request, RequestStatus
from glmserve.engine.sampled_token import SampledToken
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.scheduler import Scheduler


def make(num_blocks=64, block_size=4, budget=16, chunk=8, max_seqs=8):
    pool = BlockPool(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     chunked_prefill_size=chunk), pool), pool


def req(rid, n, max_tokens=8):
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def run_step(s):
    """Schedule, then pretend the model ran: advance and append a token where one is sampled."""
    out = s.schedule()
    for c in out.chunks:
        sample = c.completes_sequence
        s.advance(c)
        if sample:
            c.request.append_token(SampledToken(7, None, None))
    return out


def test_chunked_prefill_respects_budget_and_chunk_size():
    s, _ = make(budget=10, chunk=6)
    s.add(req("a", 20))
    s.add(req("b", 3))
    out = run_step(s)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 6), ("b", 3)]
    out = run_step(s)
    # a continues its prefill (6), b decodes (1)
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 6), ("b", 1)]
    assert out.num_tokens <= 10


def test_prefix_reuse_skips_cached_blocks():
    s, pool = make()
    a = req("a", 10)
    s.add(a)
    while a.num_computed_tokens < 10:
        run_step(s)
    s.finish(a)
    b = req("b", 10)
    s.add(b)
    out = s.schedule()
    # 2 full blocks of 4 are cached; the 3rd block (tokens 8-9) is recomputed.
    assert b.num_cached_tokens == 8 and out.chunks[0].num_new_tokens == 2
    assert pool.prefix_hits == 8


def test_full_hit_still_recomputes_last_token():
    s, _ = make()
    a = req("a", 8)
    s.add(a)
    run_step(s)
    s.finish(a)
    b = req("b", 8)
    s.add(b)
    out = s.schedule()
    assert b.num_cached_tokens == 4 and out.chunks[0].num_new_tokens == 4


def test_preemption_when_blocks_run_out_then_recovery():
    s, pool = make(num_blocks=6, block_size=2, budget=64, chunk=64)
    reqs = [req(str(i), 4, max_tokens=6) for i in range(3)]
    for r in reqs:
        s.add(r)
    preempted = 0
    for _ in range(200):
        out = run_step(s)
        preempted += len(out.preempted)
        for r in list(s.running):
            if len(r.output_token_ids) >= 6:
                s.finish(r)
        if not s.has_work():
            break
    assert preempted > 0
    assert all(len(r.output_token_ids) >= 6 for r in reqs)
    assert pool.num_free == 6


def test_request_larger_than_cache_is_rejected_not_crashing():
    s, _ = make(num_blocks=2, block_size=2)
    s.add(req("big", 10))
    out = s.schedule()
    assert out.rejected and out.rejected[0].status is RequestStatus.FINISHED and not s.has_work()


def test_max_num_seqs_limits_admission():
    s, _ = make(max_seqs=2)
    for i in range(4):
        s.add(req(str(i), 2))
    out = s.schedule()
    assert len(out.chunks) == 2 and len(s.waiting) == 2
