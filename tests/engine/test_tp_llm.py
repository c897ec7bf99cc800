"""Offline `LLM(..., tensor_parallel_size=2)`: it starts its second rank itself, generates what one rank
generates, and a rank killed under it fails the next call within seconds instead of hanging."""

from __future__ import annotations

import time

import pytest

from glmserve import LLM, SamplingParams
from tests.engine.hf_reference import make_checkpoint

PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9]}, {"prompt_token_ids": list(range(10, 40))}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # one KV head: TP 2 replicates it
    return str(make_checkpoint("glm4_moe", tmp_path_factory.mktemp("tpllm") / "m",
                               overrides={"num_key_value_heads": 1}))


@pytest.fixture(scope="module")
def single_rank_tokens(model_dir):
    llm = LLM(model_dir, dtype="float32", show_progress=False)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_llm_tp2_with_expert_parallel_generates_what_one_rank_does(model_dir, single_rank_tokens):
    llm = LLM(model_dir, dtype="float32", show_progress=False, tensor_parallel_size=2, enable_expert_parallel=True)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True)
        sampled = llm.generate(PROMPTS[:1], seeded)[0].outputs[0].token_ids
    finally:
        llm.shutdown()
    assert got == single_rank_tokens
    assert len(sampled) == 8  # the leader samples; the other rank only follows


def test_killed_rank_fails_the_next_call_quickly(model_dir):
    llm = LLM(model_dir, dtype="float32", show_progress=False, tensor_parallel_size=2)
    group = llm._group
    try:
        follower = group.procs[0]
        follower.kill()
        follower.join(5)
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            llm.generate(PROMPTS, GREEDY)
        assert time.monotonic() - start < 15
        deadline = time.monotonic() + 5
        while group.broken is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert group.broken is not None and "rank 1" in group.broken and "exited" in group.broken
    finally:
        llm.shutdown()


def test_llm_tp2_under_preemption_generates_what_one_rank_does(model_dir):
    """A cache too small for the batch: requests are preempted and recomputed, their block tables rebuilt;
    the other rank follows every table change (it is sent only the blocks each request gained)."""
    prompts = [{"prompt_token_ids": [(7 * i + j) % 200 + 2 for j in range(30)]} for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    kw = dict(dtype="float32", show_progress=False, num_kv_blocks=8, block_size=16)
    one = LLM(model_dir, **kw)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, params)]
    assert one.engine.scheduler.num_preemptions > 0  # the scenario really preempts
    two = LLM(model_dir, tensor_parallel_size=2, **kw)
    try:
        got = [o.outputs[0].token_ids for o in two.generate(prompts, params)]
        assert two.engine.scheduler.num_preemptions > 0
    finally:
        two.shutdown()
    assert got == want
