"""Which grammar (if any) a request's generated text must follow, from the API fields that ask for one:

- OpenAI `response_format` (json_object, json_schema; `text` is free);
- vLLM `structured_outputs` {json | regex | choice | grammar | json_object | structural_tag};
- vLLM's older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`;
- chat `tool_choice` "required" / a named function (tool_grammar.py), and tools marked `strict: true`
  under "auto".
At most one of them per request; a second is a 400, never silently dropped. With an open thinking
block the grammar starts after `</think>` (the engine's matcher waits for that token).
Torch-free: the grammar is sent as text and compiled by the workers.
"""

from __future__ import annotations

import json
from typing import Any

from glmserve.engine.structured_output.spec import GrammarSpec
from glmserve.router.errors import APIError

_STRUCTURED_OUTPUTS_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
                            "json_object": "json_object", "structural_tag": "structural_tag"}
# Options that only permit something (free whitespace, extra properties): our compact JSON with no
# undeclared properties satisfies them either way.
_PERMISSIONS = ("disable_any_whitespace", "disable_additional_properties")
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


def _as_text(kind: str, value: Any, param: str) -> str:
    if kind in ("json", "structural_tag"):
        if isinstance(value, str):
            return value
        if isinstance(value, (dict, bool)):
            return json.dumps(value)
        raise APIError(400, f"{param} must be a JSON schema object", param=param)
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
            raise APIError(400, f"{param} must be a non-empty list of strings", param=param)
        return json.dumps(value)
    if kind == "json_object":
        if value not in (True, None, {}):
            raise APIError(400, f"{param} must be true", param=param)
        return ""
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{param} must be a non-empty string", param=param)
    return value


def _from_response_format(rf: Any) -> tuple[str, str, str] | None:
    if rf is None:
        return None
    if not isinstance(rf, dict) or "type" not in rf:
        raise APIError(400, "response_format must be an object with a type", param="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", "", "response_format"
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "response_format.json_schema must be an object with a `schema` object",
                           param="response_format")
        # strict or not, the schema is enforced (as vLLM does): a looser promise is still kept.
        return "json", json.dumps(spec.get("schema", {})), "response_format"
    if kind == "structural_tag":
        return "structural_tag", json.dumps(rf), "response_format"
    raise APIError(400, f"response_format type {kind!r} is not supported; use text, json_object, "
                        "json_schema or structural_tag", param="response_format")


def requested_grammar(body) -> tuple[str, str, str] | None:
    """(kind, value, the field it came from) from the request body, or None."""
    found: list[tuple[str, str, str]] = []
    rf = _from_response_format(getattr(body, "response_format", None))
    if rf:
        found.append(rf)
    so = getattr(body, "structured_outputs", None)
    if so is not None:
        if not isinstance(so, dict):
            raise APIError(400, "structured_outputs must be an object", param="structured_outputs")
        for key, value in so.items():
            if value is None:
                continue
            if key in _PERMISSIONS:
                if not isinstance(value, bool):
                    raise APIError(400, f"structured_outputs.{key} must be a boolean", param="structured_outputs")
                continue
            kind = _STRUCTURED_OUTPUTS_KEYS.get(key)
            if kind is None:
                raise APIError(400, f"structured_outputs.{key} is not supported; use one of "
                                    f"{', '.join(_STRUCTURED_OUTPUTS_KEYS)}", param="structured_outputs")
            found.append((kind, _as_text(kind, value, f"structured_outputs.{key}"), f"structured_outputs.{key}"))
    for field, kind in _GUIDED_FIELDS.items():
        value = getattr(body, field, None)
        if value is not None:
            found.append((kind, _as_text(kind, value, field), field))
    if len(found) > 1:
        raise APIError(400, "only one structured output constraint per request; got "
                            + ", ".join(f for _, _, f in found), param=found[1][2])
    return found[0] if found else None


def make_spec(kind: str, value: str, param: str, start_after_token_id: int | None) -> GrammarSpec:
    try:
        return GrammarSpec(kind, value, start_after_token_id)
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None
