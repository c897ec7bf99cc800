"""Rejection sampling keeps the target distribution: on a 6-token vocabulary, tokens produced from drafts of a
different distribution (accepted or resampled) follow the target's processed distribution (chi-square with a
fixed seed, so it cannot flake), and a processed distribution equals what the plain sampler draws."""

from __future__ import annotations

import torch

from glmserve.engine.sampler import Sampler, SamplingRow
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.spec_decode.rejection import accept_or_resample, draw, processed_probs

V = 6
TRIALS = 20000
# chi-square critical value for 5 degrees of freedom at p = 0.001
CHI2_5_999 = 20.515


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was produced"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_rejection_sampling_outputs_follow_the_target():
    g = torch.Generator().manual_seed(1234)
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.0, 0.30])
    q = torch.tensor([0.40, 0.05, 0.20, 0.05, 0.30, 0.0])  # drafts often wrong, sometimes impossible under p
    counts = torch.zeros(V)
    accepted = 0
    for _ in range(TRIALS):
        d = draw(q, g)
        tok, ok = accept_or_resample(p, q, d, g)
        counts[tok] += 1
        accepted += ok
    assert _chi2(counts, p) < CHI2_5_999
    # the acceptance rate is sum(min(p, q)) = 0.05 + 0.05 + 0.10 + 0.05 = 0.25
    assert abs(accepted / TRIALS - 0.25) < 0.02


def test_processed_probs_match_the_sampler_draws():
    """temperature, top-k, top-p, min-p and penalties: frequencies of the plain sampler's tokens follow
    processed_probs for the same row (the distribution both sides of speculation use)."""
    torch.manual_seed(0)
    logits = torch.randn(1, V) * 2
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.95, min_p=0.02, repetition_penalty=1.3,
                            presence_penalty=0.5, seed=7)
    row = SamplingRow(params, [1, 2, 3, 1], num_prompt_tokens=2, generator=torch.Generator().manual_seed(7))
    probs = processed_probs(Sampler(), logits, [row])[0]
    assert abs(float(probs.sum()) - 1) < 1e-5
    counts = torch.zeros(V)
    sampler = Sampler()
    for _ in range(TRIALS // 4):
        counts[sampler(logits, [row])[0].token_id] += 1
    assert _chi2(counts, probs) < CHI2_5_999
