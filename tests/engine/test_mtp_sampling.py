"""Sampled requests with MTP speculation: drafts are accepted by rejection sampling, seeds reproduce their
tokens, and the tokens follow the same distribution as without speculation (two-sample chi-square on the
second output token over many seeds; fixed seeds, so it cannot flake). This end-to-end check is coarse (random
MTP weights, bucketed tokens); test_rejection_sampling.py is the sharp test of the acceptance rule itself."""

from __future__ import annotations

from collections import Counter

import pytest

from glmserve import LLM, SamplingParams
from glmserve.engine.tiny_model import build_tiny_model

N = 800
BUCKETS = 7  # the most frequent tokens of the reference sample, plus one "other" bucket
CHI2_7_999 = 24.322  # chi-square critical value, 7 degrees of freedom, p = 0.001
PROMPT = [5, 17, 33, 8, 2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("glm4_moe", tmp_path_factory.mktemp("mtp_sampling") / "model", seed=3)


def _second_tokens(llm: LLM) -> list[int]:
    params = [SamplingParams(temperature=1.5, max_tokens=3, ignore_eos=True, seed=s) for s in range(N)]
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * N, params)
    return [o.outputs[0].token_ids[1] for o in outs]


def test_rejection_sampling_keeps_the_distribution_and_seeds_reproduce(model_dir):
    spec = {"method": "mtp", "num_speculative_tokens": 1}
    llm = LLM(str(model_dir), dtype="float32", show_progress=False, speculative_config=spec)
    with_mtp = _second_tokens(llm)
    stats = llm.engine.speculator.stats
    assert stats.num_draft_tokens == N and 0 < stats.num_accepted_tokens < N  # both branches ran
    again = LLM(str(model_dir), dtype="float32", show_progress=False, speculative_config=spec)
    assert _second_tokens(again) == with_mtp

    plain = _second_tokens(LLM(str(model_dir), dtype="float32", show_progress=False))
    top = [t for t, _ in Counter(plain).most_common(BUCKETS)]
    bucket = lambda t: top.index(t) if t in top else BUCKETS  # noqa: E731
    a, b = Counter(map(bucket, with_mtp)), Counter(map(bucket, plain))
    chi2 = sum((a[k] - b[k]) ** 2 / (a[k] + b[k]) for k in range(BUCKETS + 1) if a[k] + b[k])
    assert chi2 < CHI2_7_999, (chi2, a, b)
