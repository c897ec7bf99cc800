"""Plain greedy requests (no logprobs, penalties, min_tokens or constraints) take the engine's fast path:
one argmax for the batch, bare token ids, a per-request stop precheck. Checked against transformers'
own `generate` (eos ends a sequence there as here), alone and batched with requests that need the full
sampler, so that neither path leaks into the other."""

from __future__ import annotations

import pytest
import torch

from glmserve import LLM, SamplingParams
from glmserve.engine.tiny_model import build_tiny_model

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny glm4_moe checkpoint, prompts, transformers' greedy continuations (stopping at eos), eos ids."""
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model("glm4_moe", tmp_path_factory.mktemp("plain") / "model", seed=5)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = set(hf.generation_config.eos_token_id or [])
    g = torch.Generator().manual_seed(11)
    allowed = torch.tensor([t for t in range(hf.config.vocab_size) if t not in eos])
    prompts = [allowed[torch.randint(len(allowed), (n,), generator=g)].tolist() for n in (6, 17, 33)]
    expected = []
    with torch.no_grad():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            expected.append(out[0, len(ids):].tolist())
    return model_dir, prompts, expected, eos


def _finish(tokens: list[int], eos: set[int]) -> str:
    return "stop" if tokens[-1] in eos else "length"


def test_plain_greedy_batch_equals_transformers(tiny):
    model_dir, prompts, expected, eos = tiny
    llm = LLM(str(model_dir), dtype="float32", show_progress=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    for out, want in zip(outs, expected):
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].finish_reason == _finish(want, eos)
        assert out.outputs[0].logprobs is None
    assert llm.engine.pool.num_used == 0 and not llm.engine.requests


def test_stop_token_on_the_fast_path(tiny):
    model_dir, prompts, expected, _ = tiny
    llm = LLM(str(model_dir), dtype="float32", show_progress=False)
    stop = expected[1][4]
    first = expected[1].index(stop)
    params = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS),
              SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, stop_token_ids=[stop]),
              SamplingParams(temperature=0.0, max_tokens=5)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert outs[0].outputs[0].token_ids == expected[0]
    stopped = outs[1].outputs[0]
    assert stopped.token_ids == expected[1][: first + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    short = outs[2].outputs[0]
    assert short.token_ids == expected[2][:5] and short.finish_reason == "length"


def test_full_sampler_requests_keep_their_features_next_to_plain_ones(tiny):
    """Plain requests that finish early, an aborted logprobs request and a live one: the live one still
    gets a logprob for every token, and every request's tokens equal transformers'."""
    model_dir, prompts, expected, eos = tiny
    llm = LLM(str(model_dir), dtype="float32", show_progress=False)
    engine = llm.engine
    engine.add_request("gone", prompts[0], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=2))
    engine.add_request("plain", prompts[0], SamplingParams(temperature=0.0, max_tokens=3))
    engine.add_request("lp", prompts[2], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=1))
    tokens: dict[str, list[int]] = {"plain": [], "lp": [], "gone": []}
    logprobs: dict[str, list] = {"lp": [], "gone": []}
    reasons = {}

    def collect(outs):
        for out in outs:
            tokens[out.request_id] += out.new_token_ids
            if out.request_id in logprobs:
                logprobs[out.request_id] += out.new_logprobs
            else:
                assert out.new_logprobs == []
            if out.finished:
                reasons[out.request_id] = out.finish_reason

    collect(engine.step())  # one prefill step: every request gets its first token
    assert [len(logprobs["gone"]), len(logprobs["lp"])] == [1, 1] and tokens["plain"] == expected[0][:1]
    assert engine.abort("gone") and not engine.abort("gone")
    while engine.has_unfinished():
        collect(engine.step())
    assert tokens["plain"] == expected[0][:3] and reasons["plain"] == "length"
    assert tokens["lp"] == expected[2] and reasons["lp"] == _finish(expected[2], eos)
    logprobs = logprobs["lp"]
    assert [t.token_id for t in logprobs] == expected[2]
    assert all(t.logprob is not None and t.logprob <= 0.0 and len(t.top_logprobs) == 1 for t in logprobs)
    # The greedy token is the most likely one: the top-1 entry is the sampled token itself.
    assert all(t.top_logprobs[0][0] == t.token_id for t in logprobs)


def test_eos_on_the_fast_path(tiny):
    """The tiny model never emits its own eos in these continuations: a request's eos set is made of a
    token it does emit. It stops there (no stop_reason); with ignore_eos it runs to max_tokens."""
    model_dir, prompts, expected, _ = tiny
    engine = LLM(str(model_dir), dtype="float32", show_progress=False).engine
    eos = expected[1][6]
    first = expected[1].index(eos)
    engine.add_request("eos", prompts[1], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS),
                       eos_token_ids=frozenset({eos}))
    engine.add_request("ignore", prompts[1], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                       eos_token_ids=frozenset({eos}))
    tokens: dict[str, list[int]] = {"eos": [], "ignore": []}
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                final[out.request_id] = (out.finish_reason, out.stop_reason)
    assert tokens["eos"] == expected[1][: first + 1] and final["eos"] == ("stop", None)
    assert tokens["ignore"] == expected[1] and final["ignore"] == ("length", None)
