"""Request migration on the engine: a request resumed from prompt + the first k generated tokens, with
resumed_output_tokens=k, generates exactly the rest of what the undisturbed request generated: greedy and
seeded sampling, penalties that count output tokens, min_tokens and max_tokens included."""

from __future__ import annotations

import pytest

from glmserve import LLM, SamplingParams

PROMPT = [5, 17, 3, 99, 42, 8, 23]


@pytest.fixture(scope="module")
def llm():
    return LLM(model=None, dtype="float32", show_progress=False)


def _tokens(llm, prompt, params):
    return llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids


@pytest.mark.parametrize("settings", [
    dict(temperature=0.0),
    dict(temperature=0.9, seed=1234),
    dict(temperature=1.1, seed=7, top_k=40, top_p=0.9, frequency_penalty=1.5, presence_penalty=0.8),
    dict(temperature=0.0, frequency_penalty=2.0, repetition_penalty=1.3),
])
@pytest.mark.parametrize("k", [1, 6])
def test_resumed_request_continues_exactly(llm, settings, k):
    full = _tokens(llm, PROMPT, SamplingParams(max_tokens=14, ignore_eos=True, **settings))
    assert len(full) == 14
    rest = _tokens(llm, PROMPT + full[:k],
                   SamplingParams(max_tokens=14, ignore_eos=True, resumed_output_tokens=k, **settings))
    assert rest == full[k:]  # max_tokens counted the resumed tokens too: exactly 14 - k more


def test_seeded_resume_without_the_replay_would_differ(llm):
    """The check above can fail: restarting the generator from the seed gives other tokens."""
    settings = dict(temperature=1.0, seed=99, max_tokens=14, ignore_eos=True)
    full = _tokens(llm, PROMPT, SamplingParams(**settings))
    naive = _tokens(llm, PROMPT + full[:4], SamplingParams(**{**settings, "max_tokens": 10}))
    assert naive != full[4:]


def test_min_tokens_counts_resumed_tokens(llm):
    eos = _tokens(llm, PROMPT, SamplingParams(max_tokens=1, temperature=0.0))[0]
    # With the first greedy token as a stop token and min_tokens=3, the stream may only stop from token 3 on.
    params = dict(temperature=0.0, max_tokens=12, min_tokens=3, stop_token_ids=[eos])
    full = _tokens(llm, PROMPT, SamplingParams(**params))
    rest = _tokens(llm, PROMPT + full[:2], SamplingParams(resumed_output_tokens=2, **params))
    assert rest == full[2:]


def test_resumed_output_tokens_is_validated():
    with pytest.raises(ValueError, match="resumed_output_tokens"):
        SamplingParams(resumed_output_tokens=-1)
