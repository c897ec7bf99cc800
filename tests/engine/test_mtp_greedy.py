"""Greedy generation with MTP speculative decoding (k = 1..4) is token-identical to transformers' `generate`
and to the engine without it, for both architectures: alone, batched, chunked, preempted, prefix-cached.

Random MTP weights almost never guess right, so the accept path is driven by an oracle: drafts replaced
by the known continuation with a wrong token planted in some of them. Stops, max_tokens and logprobs
inside accepted runs are checked against the engine without speculation."""

from __future__ import annotations


import pytest

from glmserve import LLM, SamplingParams
from glmserve.engine.tiny_model import build_tiny_model
from tests.engine.hf_reference import transformers_greedy

ARCHS = ["glm4_moe", "glm4_moe_lite"]
NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    model_dir = build_tiny_model(arch, tmp_path_factory.mktemp(arch) / "model", seed=3)
    prompts, expected = transformers_greedy(model_dir, (5, 19, 40), NEW_TOKENS, seed=11)
    return model_dir, prompts, expected


def _mtp(model_dir, k: int, **kw) -> LLM:
    return LLM(str(model_dir), dtype="float32", show_progress=False,
               speculative_config={"method": "mtp", "num_speculative_tokens": k}, **kw)


def _generate(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def _use_oracle_drafts(llm: LLM, prompts, continuations, k: int) -> None:
    """After the MTP layer drafts, replace its drafts by the true continuation; every third step one
    draft is wrong on purpose, so both full acceptance and rollback after a rejection happen."""
    spec = llm.engine.speculator
    truth = {tuple(p): c for p, c in zip(prompts, continuations)}
    original = spec._draft

    def draft(jobs, hidden):
        original(jobs, hidden)
        for rid in list(spec.drafts):
            req = llm.engine.requests[rid]
            n_out = req.num_output_tokens
            d = list(truth[tuple(req.prompt_token_ids)][n_out : n_out + k])
            if d and n_out % 3 == 0:
                wrong = len(d) // 2
                d[wrong] = (d[wrong] + 1) % llm.engine.model_config.vocab_size
            spec.drafts[rid] = d or spec.drafts[rid]

    spec._draft = draft


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_with_mtp_alone_and_batched_equals_transformers(tiny, k):
    model_dir, prompts, expected = tiny
    llm = _mtp(model_dir, k)
    assert _generate(llm, prompts[1:2]) == expected[1:2]
    assert _generate(llm, prompts) == expected
    stats = llm.engine.speculator.stats
    assert stats.num_drafts > 0 and stats.num_draft_tokens > stats.num_drafts * (k - 1)
    assert llm.engine.pool.num_used == 0


def test_chunked_prefill_mixed_with_verify_equals_transformers(tiny):
    model_dir, prompts, expected = tiny
    llm = _mtp(model_dir, 3, max_num_batched_tokens=9, chunked_prefill_size=7, enable_prefix_caching=False)
    assert _generate(llm, prompts) == expected


def test_preemption_on_a_small_pool_gives_the_same_tokens(tiny):
    model_dir, prompts, expected = tiny
    llm = _mtp(model_dir, 2, block_size=4, num_kv_blocks=24)
    _use_oracle_drafts(llm, prompts, expected, 2)
    assert _generate(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool.num_used == 0


def test_prefix_cache_hit_gives_the_same_tokens(tiny):
    model_dir, prompts, expected = tiny
    llm = _mtp(model_dir, 3, block_size=4)
    first = llm.generate([{"prompt_token_ids": prompts[2]}], GREEDY)[0]
    again = llm.generate([{"prompt_token_ids": prompts[2]}], GREEDY)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens >= 36
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == expected[2]


@pytest.mark.parametrize("k", [1, 3, 4])
def test_accepted_runs_equal_transformers_in_fewer_steps(tiny, k):
    model_dir, prompts, expected = tiny
    llm = _mtp(model_dir, k, max_num_batched_tokens=16, chunked_prefill_size=16)
    _use_oracle_drafts(llm, prompts, expected, k)
    assert _generate(llm, prompts) == expected
    stats = llm.engine.speculator.stats
    assert stats.num_accepted_tokens > 0 and stats.num_accepted_tokens < stats.num_draft_tokens
    assert stats.mean_acceptance_length > 1.5
    assert len(stats.accepted_per_position) == k and all(n > 0 for n in stats.accepted_per_position)


def test_stops_max_tokens_logprobs_inside_accepted_runs_match_no_speculation(tiny):
    model_dir, prompts, expected = tiny
    plain = LLM(str(model_dir), dtype="float32", show_progress=False)
    llm = _mtp(model_dir, 4)
    _use_oracle_drafts(llm, prompts, expected, 4)
    cases = [
        SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10, logprobs=2),  # max_tokens mid-run
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, stop_token_ids=[expected[2][9]], ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=12, stop_token_ids=[expected[0][5]],
                       ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, n=2, min_tokens=NEW_TOKENS),
    ]
    for params in cases:
        reqs = [{"prompt_token_ids": p} for p in prompts]
        ref, got = plain.generate(reqs, params), llm.generate(reqs, params)
        for r, g in zip(ref, got):
            assert len(g.outputs) == params.n
            for ro, go in zip(r.outputs, g.outputs):
                assert go.token_ids == ro.token_ids
                assert (go.finish_reason, go.stop_reason) == (ro.finish_reason, ro.stop_reason)
                if params.logprobs is not None:
                    assert len(go.logprobs) == len(go.token_ids)
                    for a, b in zip(go.logprobs, ro.logprobs):
                        assert a.keys() == b.keys()
                        for t in a:
                            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)
    assert llm.engine.speculator.stats.num_accepted_tokens > 0
    assert llm.engine.pool.num_used == 0


def test_checkpoint_without_mtp_weights_is_refused(tmp_path):
    model_dir = build_tiny_model("glm4_moe", tmp_path / "model", seed=1,
                                 overrides={"num_nextn_predict_layers": 0})
    with pytest.raises(ValueError, match="no MTP weights"):
        _mtp(model_dir, 1)


@pytest.mark.parametrize("bad", [{"method": "eagle"}, {"method": "mtp", "num_speculative_tokens": 0},
                                 {"method": "mtp", "num_speculative_tokens": 5}, {"method": "mtp", "typo": 1}])
def test_bad_speculative_config_is_refused(bad):
    from glmserve.engine.spec_decode.config import parse_speculative_config

    with pytest.raises(ValueError, match="speculative_config"):
        parse_speculative_config(bad)
