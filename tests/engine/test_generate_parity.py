"""Greedy generation through the whole engine (scheduler, paged cache, sampler) equals transformers'
`generate`, token for token, for both architectures: alone, batched, chunked, preempted, prefix-cached."""

from __future__ import annotations


import pytest

from glmserve import LLM, SamplingParams
from glmserve.engine.tiny_model import build_tiny_model
from tests.engine.hf_reference import transformers_greedy

ARCHS = ["glm4_moe", "glm4_moe_lite"]
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    model_dir = build_tiny_model(arch, tmp_path_factory.mktemp(arch) / "model", seed=3)
    prompts, expected = transformers_greedy(model_dir, (5, 19, 40), NEW_TOKENS, seed=7)
    return model_dir, prompts, expected


# min_tokens masks eos exactly as transformers' min_new_tokens does.
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


def _generate(llm: LLM, prompts) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_alone_and_batched_equal_transformers(tiny):
    model_dir, prompts, expected = tiny
    llm = LLM(str(model_dir), dtype="float32", show_progress=False)
    assert _generate(llm, prompts[1:2]) == expected[1:2]
    assert _generate(llm, prompts) == expected


def test_chunked_prefill_mixed_with_decode_equals_transformers(tiny):
    model_dir, prompts, expected = tiny
    llm = LLM(str(model_dir), dtype="float32", show_progress=False, max_num_batched_tokens=9,
              chunked_prefill_size=7, enable_prefix_caching=False)
    assert _generate(llm, prompts) == expected


def test_preemption_on_a_small_pool_gives_the_same_tokens(tiny):
    model_dir, prompts, expected = tiny
    # 3 sequences need up to (40 + 32) / 4 = 18 blocks each; 24 blocks force preemption.
    llm = LLM(str(model_dir), dtype="float32", show_progress=False, block_size=4, num_kv_blocks=24)
    assert _generate(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool.num_used == 0


def test_prefix_cache_hit_gives_the_same_tokens(tiny):
    model_dir, prompts, expected = tiny
    llm = LLM(str(model_dir), dtype="float32", show_progress=False, block_size=4)
    first = llm.generate([{"prompt_token_ids": prompts[2]}], GREEDY)[0]
    again = llm.generate([{"prompt_token_ids": prompts[2]}], GREEDY)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens >= 36
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == expected[2]
