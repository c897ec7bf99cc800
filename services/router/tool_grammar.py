"""Grammars for GLM tool calls, as xgrammar structural tags (plain JSON, compiled by the workers).

A call is `<tool_call>NAME` + the arguments as `<arg_key>K</arg_key><arg_value>V</arg_value>` pairs +
`</tool_call>`; xgrammar's `glm_xml` style turns the tool's JSON schema into exactly that (string
values raw, others as JSON), so the arguments the parser rebuilds satisfy the schema. glm45 puts a
newline after the name, glm47 does not.

- tool_choice "required": one or more calls (exactly one with parallel_tool_calls false), nothing else;
- a named function: exactly one call of it;
- "auto" with tools marked `strict: true` (or parallel_tool_calls false): free text, but once
  `<tool_call>` starts, a call to one of the tools whose arguments follow its schema (tools not marked
  strict get any arguments), and with parallel_tool_calls false nothing after the first call.
"""

from __future__ import annotations

from typing import Any

from glmserve.router.errors import APIError

# Between calls, and the most blank characters the grammar allows between tags (keeps a weak model
# from stalling in whitespace; GLM writes at most one newline there).
CALL_SEPARATOR = "\n"
MAX_WHITESPACE = 1


def _tag(tool: dict, layout: str, strict: bool) -> dict:
    fn = tool["function"]
    schema = fn.get("parameters") or {"type": "object", "properties": {}}
    if not strict:
        schema = {"type": "object"}
    begin = f"<tool_call>{fn['name']}" + ("\n" if layout == "glm45" else "")
    return {"type": "tag", "begin": begin,
            "content": {"type": "json_schema", "json_schema": schema, "style": "glm_xml",
                        "max_whitespace_cnt": MAX_WHITESPACE},
            "end": "</tool_call>"}


def _wrap(fmt: dict) -> dict:
    return {"type": "structural_tag", "format": fmt}


def tool_call_structural_tag(tools: list[dict], tool_choice: Any, parallel: bool, layout: str) -> dict | None:
    """The structural tag for this request's tool_choice, or None when calls are unconstrained."""
    if isinstance(tool_choice, dict):  # named function (already checked to be in tools)
        name = tool_choice["function"]["name"]
        tool = next(t for t in tools if t["function"]["name"] == name)
        return _wrap(_tag(tool, layout, strict=True))
    if tool_choice == "required":
        if not tools:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        return _wrap({"type": "tags_with_separator", "tags": [_tag(t, layout, True) for t in tools],
                      "separator": CALL_SEPARATOR, "at_least_one": True, "stop_after_first": not parallel})
    if tool_choice in (None, "auto") and (not parallel or any(t["function"].get("strict") for t in tools)):
        tags = [_tag(t, layout, bool(t["function"].get("strict"))) for t in tools]
        return _wrap({"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": tags,
                      "at_least_one": False, "stop_after_first": not parallel})
    return None
