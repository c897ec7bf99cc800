"""Rejection sampling of drafts (Leviathan et al. / Chen et al. 2023): the accepted tokens are distributed
exactly as the target's sampler would draw them alone.

Both distributions go through the same processing as the sampler (min_tokens masking, penalties on the
token history at that position, temperature, top-k, top-p, min-p). A draft d drawn from q is accepted
with probability min(1, p[d] / q[d]); on rejection the token is drawn from max(p - q, 0), normalised.
Every draw uses the request's own generator when it is seeded, so a seed reproduces its tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from glmserve.engine.sampler import Sampler, SamplingRow, apply_min_p, apply_top_k, apply_top_p


def processed_probs(sampler: Sampler, logits: Tensor, rows: list[SamplingRow]) -> Tensor:
    """[B, V] probabilities the sampler draws from for each row (greedy rows: one-hot on the argmax)."""
    x = sampler.penalized_logits(logits.float(), rows)
    out = torch.empty_like(x)
    for j, r in enumerate(rows):  # per row: drafts are few per step, and each row has its own settings
        p = r.params
        if p.greedy:
            out[j] = 0.0
            out[j, x[j].argmax()] = 1.0
            continue
        row = (x[j] / p.temperature).unsqueeze(0)
        if p.top_k > 0:
            row = apply_top_k(row, torch.tensor([p.top_k]))
        if p.top_p < 1.0:
            row = apply_top_p(row, torch.tensor([p.top_p]))
        if p.min_p > 0.0:
            row = apply_min_p(row, torch.tensor([p.min_p]))
        out[j] = row.softmax(dim=-1)[0]
    return out


def draw(probs: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def accept_or_resample(p: Tensor, q: Tensor, draft: int, generator: torch.Generator | None) -> tuple[int, bool]:
    """(token, accepted): the draft with probability min(1, p/q), else a draw from the residual max(p - q, 0)."""
    u = float(torch.rand(1, generator=generator, device=p.device))
    if q[draft] > 0 and u * float(q[draft]) < float(p[draft]):
        return draft, True
    residual = (p - q).clamp_(min=0.0)
    total = float(residual.sum())
    return draw(residual / total if total > 0 else p, generator), False
