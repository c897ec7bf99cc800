"""Request fields that constrain which tokens come next, turned into engine settings:
structured outputs (structured_request.py), logit_bias, allowed_token_ids, bad_words, best_of."""

from __future__ import annotations

from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.structured_output.spec import GrammarSpec
from glmserve.router.errors import APIError


def _logit_bias(raw: dict | None) -> dict[int, float] | None:
    if not raw:
        return None
    out = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise APIError(400, f"logit_bias values must be numbers, got {value!r}", param="logit_bias")
        out[token] = float(value)
    return out


def _bad_words(words: list[str] | None, tokenizer) -> list[list[int]] | None:
    """Each bad word as it would be tokenized alone and after a space (vLLM bans both)."""
    if not words:
        return None
    out: list[list[int]] = []
    for w in words:
        if not isinstance(w, str) or not w.strip():
            raise APIError(400, "bad_words must be non-empty strings", param="bad_words")
        for variant in (w, " " + w.lstrip()):
            ids = tokenizer.encode(variant)
            if ids and ids not in out:
                out.append(ids)
    return out


def apply_constraints(params: SamplingParams, body, tokenizer, grammar: GrammarSpec | None) -> SamplingParams:
    """Set the constraint fields of params (built by build_sampling_params) from the request body."""
    best_of = getattr(body, "best_of", None)
    if best_of is not None and best_of != params.n:
        raise APIError(400, f"best_of={best_of} is not supported: it must be unset or equal n ({params.n}); "
                            "request n choices instead", param="best_of")
    params.structured_output = grammar
    params.logit_bias = _logit_bias(getattr(body, "logit_bias", None))
    params.allowed_token_ids = getattr(body, "allowed_token_ids", None)
    params.bad_words_token_ids = _bad_words(getattr(body, "bad_words", None), tokenizer)
    try:
        params._validate_constraints()
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    return params
