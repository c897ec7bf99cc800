"""vLLM's `speculative_config` ({"method": "mtp", "num_speculative_tokens": k}) into EngineConfig's two fields."""

from __future__ import annotations

from typing import Any

MAX_SPECULATIVE_TOKENS = 4  # GLM ships one next-n layer; chaining it further gives little (issue 10: k = 1..4)
_KNOWN_KEYS = {"method", "num_speculative_tokens"}


def parse_speculative_config(raw: dict[str, Any] | None) -> tuple[str, int]:
    """(speculative_algorithm, speculative_num_steps); ("none", 1) for None. Unknown keys and values are refused."""
    if raw is None:
        return "none", 1
    if not isinstance(raw, dict):
        raise ValueError("speculative_config must be a JSON object like {\"method\": \"mtp\", \"num_speculative_tokens\": 3}")
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"speculative_config: unsupported keys {unknown}; supported: {sorted(_KNOWN_KEYS)}")
    method = raw.get("method")
    if method != "mtp":
        raise ValueError(f"speculative_config: method {method!r} is not supported; only \"mtp\"")
    k = raw.get("num_speculative_tokens", 1)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"speculative_config: num_speculative_tokens must be an integer in 1..{MAX_SPECULATIVE_TOKENS}, got {k!r}")
    return "mtp", k
