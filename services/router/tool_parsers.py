"""GLM tool-call parsers: model text in, content plus structured tool calls out.

GLM-4.5/4.6 (`glm45`) and GLM-4.7 (`glm47`) write a call as
    <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>
glm45 puts a newline after NAME, between key and value and after each pair; glm47 writes it compact.
One tolerant state machine reads both: whitespace (or anything else) between the tags of a call is
ignored.

Rules, identical for streaming and non-streaming (`parse` runs the streaming machine on the whole text):
- A call counts once `<tool_call>NAME` is followed by `<arg_key>` or `</tool_call>`. Anything else
  after the tag (an invalid name, a second word, JSON) makes it plain content, tag included.
- A value stays text when the tool's JSON schema allows a string for the parameter (`string`, a type
  list or anyOf/oneOf with a string branch, string enums), so "123" stays "123"; otherwise it is
  decoded as JSON, falling back to text. The argument fragments concatenate to `json.dumps(args)`.
- A call is emitted once it is complete (`</tool_call>`): a call cut off by the end of the output
  (max_tokens) is returned as content, text as written, never as a half-written call.
- Whitespace right before a call, and trailing whitespace when the output holds calls, is dropped.
- No prefix of a tag ever reaches content: a possible partial tag at the end is held back.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
ARG_KEY_START, ARG_KEY_END = "<arg_key>", "</arg_key>"
ARG_VALUE_START, ARG_VALUE_END = "<arg_value>", "</arg_value>"

# Leading whitespace, a (possibly still partial) function name, whitespace.
_NAME_RE = re.compile(r"(\s*)([\w.:/\-]*)(\s*)")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class ParsedToolCalls:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class DeltaEvent:
    """A content delta (kind "content": `text`) or a tool-call delta (kind "tool_call").

    A call's first delta carries its `index`, `id` and `name`; later ones carry argument JSON
    fragments in `arguments` for the same index.
    """

    kind: Literal["content", "tool_call"]
    text: str = ""
    index: int = -1
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def partial_tag_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of tags."""
    for k in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        tail = text[-k:]
        if any(tag.startswith(tail) for tag in tags):
            return k
    return 0


def merge_events(events: list[DeltaEvent]) -> ParsedToolCalls:
    """Fold streamed deltas into the non-streaming result."""
    content, calls = [], {}
    for ev in events:
        if ev.kind == "content":
            content.append(ev.text)
            continue
        call = calls.setdefault(ev.index, {"id": "", "name": "", "arguments": []})
        call["id"] = ev.id or call["id"]
        call["name"] = ev.name or call["name"]
        call["arguments"].append(ev.arguments)
    tool_calls = [ToolCall(c["id"], c["name"], "".join(c["arguments"])) for _, c in sorted(calls.items())]
    return ParsedToolCalls("".join(content), tool_calls)


def _string_params(tools: list[dict] | None) -> dict[str, set[str]]:
    """For each tool name, the parameters its JSON schema types as strings."""
    out: dict[str, set[str]] = {}
    for tool in tools or []:
        fn = tool.get("function", tool)
        props = (fn.get("parameters") or {}).get("properties") or {}
        out[fn.get("name", "")] = {key for key, schema in props.items() if _is_string_schema(schema)}
    return out


def _is_string_schema(schema: Any) -> bool:
    """Whether the schema allows a string: then a value like 123 or true is kept as the text written."""
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if isinstance(kind, list):  # e.g. ["string", "null"], ["integer", "string"]
        return "string" in kind
    if kind is None and schema.get("enum"):
        return all(isinstance(v, str) for v in schema["enum"])
    if kind is None and any(_is_string_schema(s) for key in ("anyOf", "oneOf") for s in schema.get(key) or []):
        return True
    return kind == "string"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity would make the arguments invalid JSON


def _decode_value(raw: str) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        return raw


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class GlmToolParser:
    """Streaming and non-streaming parser for GLM `<tool_call>` blocks (both layouts)."""

    def __init__(self, tools: list[dict] | None = None, grammar_padding: bool = False):
        self._tools = tools
        # Calls written under the tool grammar (router/tool_grammar.py): xgrammar's glm_xml style lets
        # one blank pad each side of a value, which is layout, not part of the value.
        self._grammar_padding = grammar_padding
        self._string_params = _string_params(tools)
        self._buf = ""  # text not yet consumed
        self._state = "content"  # content | name | body | key | after_key | value
        self._held_ws = ""  # trailing content whitespace, emitted only if more content follows
        self._events: list[DeltaEvent] = []
        self._index = -1  # index of the current / last tool call
        self._name = ""
        self._key = ""
        self._value_is_string = False
        self._num_args = 0
        self._pending: list[DeltaEvent] = []  # events of the open call, released at </tool_call>
        self._call_text = ""  # text after the open call's <tool_call>, to return it as content if cut off

    # ----------------------------------------------------------------------------------- API

    def parse(self, text: str) -> ParsedToolCalls:
        """Non-streaming: the whole output at once (does not touch this parser's stream state)."""
        fresh = type(self)(self._tools, self._grammar_padding)
        return merge_events(fresh.feed(text) + fresh.finish())

    def feed(self, delta_text: str) -> list[DeltaEvent]:
        self._buf += delta_text
        if self._state != "content":
            self._call_text += delta_text
        while self._step(final=False):
            pass
        return self._take()

    def finish(self) -> list[DeltaEvent]:
        """End of output: flush held text and close a call cut off mid-way."""
        while self._step(final=True):
            pass
        if self._state == "name":  # the call never became one
            self._content(TOOL_CALL_START + self._buf)
        elif self._state != "content":  # cut off: the call as written becomes content
            self._pending = []
            self._content(TOOL_CALL_START + self._call_text)
        else:
            self._content(self._buf)
        self._buf, self._state = "", "content"
        if self._index < 0 and self._held_ws:  # keep trailing whitespace of plain content
            self._events.append(DeltaEvent("content", text=self._held_ws))
        self._held_ws = ""
        return self._take()

    # ------------------------------------------------------------------------------ machine

    def _take(self) -> list[DeltaEvent]:
        events, self._events = self._events, []
        return events

    def _step(self, final: bool) -> bool:
        """Consume what the buffer allows in the current state; True when progress was made."""
        return getattr(self, f"_step_{self._state}")(final)

    def _step_content(self, final: bool) -> bool:
        i = self._buf.find(TOOL_CALL_START)
        if i >= 0:
            self._content(self._buf[:i])  # its trailing whitespace waits: the call may be malformed
            self._buf, self._state = self._buf[i + len(TOOL_CALL_START):], "name"
            self._call_text = self._buf
            return True
        if not final:
            safe = len(self._buf) - partial_tag_len(self._buf, (TOOL_CALL_START,))
            self._content(self._buf[:safe])
            self._buf = self._buf[safe:]
        return False

    def _step_name(self, final: bool) -> bool:
        m = _NAME_RE.match(self._buf)
        rest = self._buf[m.end():]
        if not rest:
            return False  # name (or the whitespace after it) may still be growing
        name = m.group(2)
        tags = (ARG_KEY_START, TOOL_CALL_END)
        if name and any(rest.startswith(tag) for tag in tags):
            self._open_call(name)
            self._buf, self._state = rest, "body"
            return True
        if name and not final and any(tag.startswith(rest) for tag in tags):
            return False  # a tag is still arriving
        # Not a call: the tag and what follows are content (rescanned, it may hold another call).
        self._content(TOOL_CALL_START)
        self._state = "content"
        return True

    def _step_body(self, final: bool) -> bool:
        tag, i = self._find_first((ARG_KEY_START, TOOL_CALL_END))
        if tag is None:
            self._drop_junk((ARG_KEY_START, TOOL_CALL_END))
            return False
        self._buf = self._buf[i + len(tag):]
        if tag == TOOL_CALL_END:
            self._close_call()
        else:
            self._state = "key"
        return True

    def _step_key(self, final: bool) -> bool:
        i = self._buf.find(ARG_KEY_END)
        if i < 0:
            return False
        self._key = self._buf[:i].strip()
        self._buf, self._state = self._buf[i + len(ARG_KEY_END):], "after_key"
        return True

    def _step_after_key(self, final: bool) -> bool:
        tags = (ARG_VALUE_START, ARG_KEY_START, TOOL_CALL_END)
        tag, i = self._find_first(tags)
        if tag is None:
            self._drop_junk(tags)
            return False
        self._buf = self._buf[i + len(tag):]
        if tag == ARG_VALUE_START:
            self._start_value()
        elif tag == ARG_KEY_START:  # a key without a value: forget it
            self._state = "key"
        else:
            self._close_call()
        return True

    def _step_value(self, final: bool) -> bool:
        i = self._buf.find(ARG_VALUE_END)
        if i < 0:
            return False  # the call is emitted whole at </tool_call>, so the value can wait for its end
        self._end_value(self._buf[:i])
        self._buf, self._state = self._buf[i + len(ARG_VALUE_END):], "body"
        return True

    # ------------------------------------------------------------------------------ helpers

    def _find_first(self, tags: tuple[str, ...]) -> tuple[str | None, int]:
        found = [(i, tag) for tag in tags if (i := self._buf.find(tag)) >= 0]
        if not found:
            return None, -1
        i, tag = min(found)
        return tag, i

    def _drop_junk(self, tags: tuple[str, ...]) -> None:
        """Inside a call, text between the tags carries nothing: keep only a possible partial tag."""
        keep = partial_tag_len(self._buf, tags)
        self._buf = self._buf[len(self._buf) - keep:] if keep else ""

    def _content(self, text: str) -> None:
        text = self._held_ws + text
        kept = text.rstrip()
        self._held_ws = text[len(kept):]
        if kept:
            self._events.append(DeltaEvent("content", text=kept))

    def _args(self, fragment: str) -> None:
        if fragment:
            self._pending.append(DeltaEvent("tool_call", index=self._index, arguments=fragment))

    def _open_call(self, name: str) -> None:
        self._held_ws = ""  # whitespace before a call carries nothing
        self._index += 1
        self._name, self._num_args = name, 0
        self._pending = [DeltaEvent("tool_call", index=self._index, id=_new_call_id(), name=name)]

    def _start_value(self) -> None:
        self._value_is_string = self._key in self._string_params.get(self._name, ())
        sep = "{" if self._num_args == 0 else ", "
        self._num_args += 1
        self._args(f"{sep}{_json(self._key)}: ")
        self._state = "value"

    def _end_value(self, raw: str) -> None:
        if self._grammar_padding:
            raw = raw[1:] if raw[:1].isspace() else raw
            raw = raw[:-1] if raw[-1:].isspace() else raw
        self._args(_json(raw if self._value_is_string else _decode_value(raw)))

    def _close_call(self) -> None:
        self._args("}" if self._num_args else "{}")
        self._events += self._pending
        self._pending = []
        self._state = "content"


class Glm45ToolParser(GlmToolParser):
    """GLM-4.5 / 4.6: `<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n</tool_call>`."""


class Glm47ToolParser(GlmToolParser):
    """GLM-4.7 / 4.7-Flash: `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>`."""


_TOOL_PARSERS: dict[str, type[GlmToolParser]] = {"glm45": Glm45ToolParser, "glm47": Glm47ToolParser}


def get_tool_parser(name: str) -> type[GlmToolParser]:
    try:
        return _TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; choose from {sorted(_TOOL_PARSERS)}") from None
