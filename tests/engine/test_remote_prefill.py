"""Requests whose prompt KV comes from a prefill worker, inside the engine (no network): they queue with
everything else, hold a sequence slot and their blocks while WAITING_FOR_REMOTE_KVS, reuse this worker's
own prefix cache, and aborting them at any stage frees exactly their blocks, after the connector was
told. The transfer itself is simulated by copying the KV another engine computed (the "prefill worker")."""

from __future__ import annotations

import pytest

from glmserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.engine import EngineBusy, LLMEngine
from glmserve.engine.request import RequestStatus
from glmserve.engine.sampler import SampledToken
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.scheduler import SchedulerOutput
from glmserve.engine.tiny_model import build_tiny_model

BS = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


class Connector:
    def __init__(self):
        self.allocated, self.freed = [], []

    def blocks_allocated(self, req):
        self.allocated.append((req.request_id, list(req.block_ids), req.num_computed_tokens))

    def request_freed(self, req):
        self.freed.append(req.request_id)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("glm4_moe", tmp_path_factory.mktemp("remote") / "m", seed=5)


def make_engine(model_dir, num_blocks=32, max_seqs=8):
    cfg = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", show_progress=False,
                       cache=CacheConfig(block_size=BS, num_blocks=num_blocks),
                       scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=64, chunked_prefill_size=64))
    engine = LLMEngine(cfg)
    engine.scheduler.kv_connector = Connector()
    return engine


def run_remote(engine, rid, prompt):
    engine.add_request(rid, prompt, GREEDY, remote_prefill=True)
    engine.step()
    return engine.requests[rid]


def send_kv(donor, donor_req, engine, req):
    """What the KV link does: the donor's prompt KV, block by block, into the receiver's blocks (same
    block size and layout), from the first block the receiver does not hold."""
    first_block = req.num_computed_tokens // BS
    for layer, cache in enumerate(engine.runner.kv_caches):
        for dst, src in list(zip(req.block_ids, donor_req.block_ids))[first_block:]:
            cache[dst] = donor.runner.kv_caches[layer][src]


def test_remote_request_waits_in_its_own_state_holding_prompt_blocks(model_dir):
    engine = make_engine(model_dir)
    prompt = list(range(1, 11))  # 10 tokens: 3 blocks for prompt + first token
    req = run_remote(engine, "r", prompt)
    assert req.status is RequestStatus.WAITING_FOR_REMOTE_KVS
    assert len(req.block_ids) == 3 and engine.pool.num_used == 3
    assert engine.scheduler.kv_connector.allocated == [("r", req.block_ids, 0)]
    assert not engine.scheduler.running and engine.stats()["num_requests_waiting"] == 1
    engine.abort("r")
    assert engine.pool.num_used == 0 and engine.scheduler.kv_connector.freed == ["r"]


def test_abort_before_admission_frees_nothing_and_tells_no_connector(model_dir):
    engine = make_engine(model_dir, num_blocks=3)
    run_remote(engine, "big", list(range(1, 11)))  # takes all 3 blocks
    engine.add_request("queued", [1, 2, 3], GREEDY, remote_prefill=True)
    engine.step()
    assert engine.requests["queued"].status is RequestStatus.WAITING and engine.pool.num_free == 0
    engine.abort("queued")
    engine.abort("big")
    assert engine.pool.num_used == 0 and engine.scheduler.kv_connector.freed == ["big"]


def test_max_num_seqs_counts_requests_waiting_for_kv(model_dir):
    engine = make_engine(model_dir, max_seqs=2)
    for i in range(4):
        engine.add_request(f"r{i}", [1, 2, 3, 4, 5], GREEDY, remote_prefill=True)
    engine.step()
    assert len(engine.scheduler.waiting_for_kv) == 2 and len(engine.scheduler.waiting) == 2
    engine.abort("r0")
    engine.step()
    assert sorted(engine.scheduler.waiting_for_kv) == ["r1", "r2"]


def test_queue_bound_refuses_with_a_retriable_error(model_dir):
    engine = make_engine(model_dir, num_blocks=3)
    engine.add_request("a", list(range(1, 11)), GREEDY, remote_prefill=True, max_waiting_remote=1)
    engine.step()  # a holds every block
    engine.add_request("b", [1, 2], GREEDY, remote_prefill=True, max_waiting_remote=1)
    with pytest.raises(EngineBusy, match="queue is full"):
        engine.add_request("c", [1, 2], GREEDY, remote_prefill=True, max_waiting_remote=1)


def tokens_of(outputs):
    return [t for out in outputs for t in out.new_token_ids]


@pytest.mark.parametrize("reuse", [False, True])
def test_arrival_joins_the_batch_and_decodes_like_a_local_request(model_dir, reuse):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    local = make_engine(model_dir)
    local.add_request("l", prompt, GREEDY)
    expected = tokens_of(local.run_until_done())

    engine = make_engine(model_dir)
    if reuse:  # this worker already served a request sharing the first 2 blocks
        engine.add_request("earlier", prompt[:8] + [7, 7], GREEDY)
        engine.run_until_done()
    donor = make_engine(model_dir)  # plays the prefill worker
    donor.add_request("p", prompt, GREEDY)
    first = tokens_of(donor.step())[0]
    req = run_remote(engine, "r", prompt)
    assert req.num_computed_tokens == (8 if reuse else 0)
    assert engine.scheduler.kv_connector.allocated[-1][2] == req.num_computed_tokens
    send_kv(donor, donor.requests["p"], engine, req)
    engine.remote_kv_arrived("r", SampledToken(first), num_cached_tokens=0)
    assert req.status is RequestStatus.RUNNING and req.num_computed_tokens == len(prompt)
    assert req.num_registered_blocks == len(prompt) // BS  # received blocks are findable from now on
    assert [first] + tokens_of(engine.run_until_done()) == expected
    assert engine.pool.num_used == 0


def test_preempted_remote_request_is_recomputed_locally(model_dir):
    prompt = [2, 7, 1, 8, 2, 8]
    engine = make_engine(model_dir, num_blocks=4)
    donor = make_engine(model_dir)
    donor.add_request("p", prompt, GREEDY)
    first = tokens_of(donor.step())[0]
    req = run_remote(engine, "r", prompt)
    send_kv(donor, donor.requests["p"], engine, req)
    engine.remote_kv_arrived("r", SampledToken(first))
    engine.scheduler._preempt(req, SchedulerOutput())  # what a step short of blocks does to it
    assert req.status is RequestStatus.WAITING and not req.remote_prefill and req.block_ids == []
    out = tokens_of(engine.run_until_done())
    local = make_engine(model_dir)
    local.add_request("l", prompt, GREEDY)
    assert [first] + out == tokens_of(local.run_until_done())
