"""What grammar a request asks for, as plain data: it travels router -> decode -> prefill unchanged.

Torch-free on purpose: the router builds these."""

from __future__ import annotations

import json
from dataclasses import dataclass

# json: a JSON schema (text); json_object: any JSON object; regex; choice: a JSON list of strings;
# grammar: EBNF (GBNF dialect, as xgrammar/vLLM read it); structural_tag: xgrammar's structural tag JSON.
GRAMMAR_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class GrammarSpec:
    kind: str
    value: str = ""
    # The grammar starts once this token was generated (the end of a thinking block); None: at once.
    start_after_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, got {self.kind!r}")
        if self.kind == "json":
            try:
                schema = json.loads(self.value)
            except ValueError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("the JSON schema must be an object")
        if self.kind == "choice":
            choices = json.loads(self.value)
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
                raise ValueError("choice must be a non-empty list of strings")
        if self.kind in ("regex", "grammar", "structural_tag") and not self.value:
            raise ValueError(f"{self.kind} must not be empty")

    @property
    def cache_key(self) -> tuple[str, str]:
        # start_after_token_id does not change the compiled grammar, only when the matcher starts.
        return self.kind, self.value
