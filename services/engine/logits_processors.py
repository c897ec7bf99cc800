"""Per-request edits of the logits before sampling: logit_bias, allowed_token_ids, bad_words.

Like vLLM they act after the logprobs are taken (logprobs stay those of the raw model) and before
penalties, temperature and the truncation knobs. Token ids past the vocabulary are refused here,
where the vocabulary size is known."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_NEG_INF = float("-inf")


def _check_ids(ids: Sequence[int], vocab: int, what: str) -> None:
    bad = [t for t in ids if t >= vocab]
    if bad:
        raise ValueError(f"{what} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


def validate_token_constraints(params, vocab: int) -> None:
    """Called when a request is added, so a bad id is a clear error, not an index error mid-batch."""
    _check_ids(list(params.logit_bias or {}), vocab, "logit_bias")
    _check_ids(params.allowed_token_ids or [], vocab, "allowed_token_ids")
    for seq in params.bad_words_token_ids or []:
        _check_ids(seq, vocab, "bad_words")


def has_token_constraints(params) -> bool:
    return bool(params.logit_bias or params.allowed_token_ids or params.bad_words_token_ids)


def banned_by_bad_words(bad_words: list[list[int]], output: Sequence[int]) -> list[int]:
    """Last tokens of the bad words whose other tokens the output just ended with."""
    out = []
    for seq in bad_words:
        prefix = seq[:-1]
        if not prefix or list(output[len(output) - len(prefix):]) == prefix:
            out.append(seq[-1])
    return out


def apply_token_constraints(logits: Tensor, rows) -> Tensor:
    """A new tensor with every row's constraints applied (rows are sampler.SamplingRow)."""
    out = logits.clone()
    device = logits.device
    for i, r in enumerate(rows):
        p = r.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=device)
            out[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=out.dtype, device=device)
        if p.allowed_token_ids:
            keep = torch.zeros(out.shape[1], dtype=torch.bool, device=device)
            keep[torch.tensor(p.allowed_token_ids, device=device)] = True
            out[i].masked_fill_(~keep, _NEG_INF)
        if p.bad_words_token_ids:
            banned = banned_by_bad_words(p.bad_words_token_ids, r.output_token_ids)
            if banned:
                out[i, torch.tensor(banned, device=device)] = _NEG_INF
    return out
