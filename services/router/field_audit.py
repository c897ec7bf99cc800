"""No request field is silently ignored: every field the router reads works (protocol.py), a few
OpenAI metadata fields that change nothing about the output are accepted, and anything else, or an
option set to a value we do not implement, is refused with a 400 naming it."""

from __future__ import annotations

from glmserve.router.errors import APIError

# OpenAI fields that only label or route a request on OpenAI's side; they cannot change the output.
# `store` only when false (checked below).
METADATA_FIELDS = frozenset({"metadata", "service_tier", "prompt_cache_key", "safety_identifier", "store"})


def refuse_unsupported_fields(body) -> None:
    extra = sorted(k for k in (body.model_extra or {}) if k not in METADATA_FIELDS)
    if extra:
        raise APIError(400, f"unsupported request field(s): {', '.join(extra)}", param=extra[0])
    if (body.model_extra or {}).get("store"):
        raise APIError(400, "store: true is not supported (nothing is stored)", param="store")
    if body.stream_options is not None and body.stream_options.continuous_usage_stats:
        raise APIError(400, "stream_options.continuous_usage_stats is not supported", param="stream_options")
    if getattr(body, "continue_final_message", False):
        raise APIError(400, "continue_final_message is not supported", param="continue_final_message")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
