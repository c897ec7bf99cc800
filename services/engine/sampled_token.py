"""One sampled token and its logprobs: what the engine emits and the router formats.

Kept apart from the sampler (which needs torch) so that the router, which never samples, imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # of the sampled token, under the raw logits; None unless asked
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), descending
