"""Reasoning + tool-call parsing of GLM outputs in the shapes users reported as broken against vLLM and
SGLang (GLM-4.5/4.6/4.7 tool parser and reasoning parser issues): zero-argument calls, values holding
`<`, newlines or JSON-looking text, several calls in one delta, unicode, typed parameters, calls inside
`<think>`, GLM-4.5 replies that never open `<think>`, and calls cut off by max_tokens.

Each case runs the router's two parsers the way ChoiceStream chains them, once on the whole text and
streamed split at every character (and one character at a time): all must agree with the expectation."""

from __future__ import annotations

import json

import pytest

from glmserve.router.reasoning_parser import Glm45ReasoningParser
from glmserve.router.tool_parsers import get_tool_parser

TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "run", "parameters": {"type": "object", "properties": {
        "code": {"type": "string"}, "note": {"type": "string"}, "zip": {"type": "string"},
        "id": {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "ref": {"type": ["integer", "string"]},
        "n": {"type": "integer"}, "x": {"type": "number"}, "ok": {"type": "boolean"},
        "opts": {"type": "object"}, "items": {"type": "array"}, "mode": {"enum": ["fast", "slow"]},
        "maybe": {"type": ["integer", "null"]}}}}},
]


def call(name: str, pairs: list[tuple[str, str]], layout: str = "glm47") -> str:
    nl = "\n" if layout == "glm45" else ""
    body = "".join(f"<arg_key>{k}</arg_key>{nl}<arg_value>{v}</arg_value>{nl}" for k, v in pairs)
    return f"<tool_call>{name}{nl}{body}</tool_call>"


# name -> (model output, starts_in_think, thinking_enabled, reasoning, content, [(name, args)])
CASES = {
    "zero_arg_glm47": (call("get_time", []), False, True, None, "", [("get_time", {})]),
    "zero_arg_glm45": (call("get_time", [], "glm45"), False, True, None, "", [("get_time", {})]),
    "value_with_lt_gt": (call("run", [("code", "if a < b and c > d: pass")]), False, True, None, "",
                         [("run", {"code": "if a < b and c > d: pass"})]),
    "value_with_tag_lookalikes": (call("run", [("code", "x = '<arg_key>' + '</tool' + '<b>'")]), False, True,
                                  None, "", [("run", {"code": "x = '<arg_key>' + '</tool' + '<b>'"})]),
    "value_with_newlines": (call("run", [("code", "def f():\n    return 1\n\n")], "glm45"), False, True, None,
                            "", [("run", {"code": "def f():\n    return 1\n\n"})]),
    "json_looking_string_stays_string": (call("run", [("note", '{"a": [1, 2]}')]), False, True, None, "",
                                         [("run", {"note": '{"a": [1, 2]}'})]),
    "numeric_looking_string_stays_string": (call("run", [("zip", "00123")]), False, True, None, "",
                                            [("run", {"zip": "00123"})]),
    "anyof_with_string_keeps_text": (call("run", [("id", "42")]), False, True, None, "", [("run", {"id": "42"})]),
    "type_list_with_string_keeps_text": (call("run", [("ref", "7")]), False, True, None, "",
                                         [("run", {"ref": "7"})]),
    "typed_integer_number_boolean": (call("run", [("n", "7"), ("x", "3.5e2"), ("ok", "false")]), False, True,
                                     None, "", [("run", {"n": 7, "x": 350.0, "ok": False})]),
    "object_and_array_values": (call("run", [("opts", '{"k": "<v>", "z": null}'), ("items", '["<a>", 2]')]),
                                False, True, None, "", [("run", {"opts": {"k": "<v>", "z": None},
                                                                 "items": ["<a>", 2]})]),
    "nullable_integer_null": (call("run", [("maybe", "null")]), False, True, None, "", [("run", {"maybe": None})]),
    "string_enum": (call("run", [("mode", "fast")]), False, True, None, "", [("run", {"mode": "fast"})]),
    "two_calls_glm47_back_to_back": (call("get_time", []) + call("run", [("n", "1")]), False, True, None, "",
                                     [("get_time", {}), ("run", {"n": 1})]),
    "two_calls_glm45_newline": (call("run", [("n", "1")], "glm45") + "\n" + call("run", [("n", "2")], "glm45"),
                                False, True, None, "", [("run", {"n": 1}), ("run", {"n": 2})]),
    "unicode_values": (call("run", [("note", "São Paulo 🌞 東京\u200b")]), False, True, None, "",
                       [("run", {"note": "São Paulo 🌞 東京\u200b"})]),
    "call_inside_think_glm47": ("I should check.<tool_call>get_time</tool_call>", True, True, "I should check.",
                                "", [("get_time", {})]),
    "call_right_after_think": ("Plan it.</think>" + call("run", [("n", "3")]), True, True, "Plan it.", "",
                               [("run", {"n": 3})]),
    "content_then_call_after_think": ("Plan.</think>\nOn it.\n" + call("get_time", [], "glm45"), True, True,
                                      "Plan.", "On it.", [("get_time", {})]),
    "glm45_reply_without_think": ("The answer is 4.", False, True, None, "The answer is 4.", []),
    "glm45_reply_opening_think_itself": ("<think>Add.</think>\nIt is 4.", False, True, "Add.", "It is 4.", []),
    "glm47_open_think_never_closed": ("Still thinking about", True, True, "Still thinking about", "", []),
    "thinking_disabled_is_content": ("No think here " + call("get_time", []), False, False, None,
                                     "No think here", [("get_time", {})]),
    "cut_off_call_is_content": ("Let me run it." + call("run", [("code", "print(1)")])[:-20], False, True, None,
                                "Let me run it." + call("run", [("code", "print(1)")])[:-20], []),
    "prose_mentioning_the_tag": ("Use the <tool_call> tag like <tool_call>{json}</tool_call>.", False, True, None,
                                 "Use the <tool_call> tag like <tool_call>{json}</tool_call>.", []),
}


def run(pieces: list[str], starts_in_think: bool, thinking: bool, layout: str):
    reasoning_parser = Glm45ReasoningParser(thinking_enabled=thinking, starts_in_think=starts_in_think)
    tool_parser = get_tool_parser(layout)(TOOLS)
    reasoning, content, calls = "", "", {}
    for i, piece in enumerate(pieces + [None]):
        r, c = reasoning_parser.feed(piece) if piece is not None else reasoning_parser.finish()
        reasoning += r
        events = tool_parser.feed(c) if c else []
        if piece is None:
            events += tool_parser.finish()
        for ev in events:
            if ev.kind == "content":
                content += ev.text
            else:
                entry = calls.setdefault(ev.index, [None, ""])
                entry[0] = ev.name or entry[0]
                entry[1] += ev.arguments or ""
    return reasoning or None, content, [(n, json.loads(a)) for n, a in (calls[i] for i in sorted(calls))]


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("layout", ["glm45", "glm47"])
@pytest.mark.parametrize("case", CASES)
def test_case_whole_and_streamed_at_every_split(case: str, layout: str):
    text, starts_in_think, thinking, reasoning, content, calls = CASES[case]
    want = (reasoning, content, calls)
    assert run([text], starts_in_think, thinking, layout) == want
    assert run(list(text), starts_in_think, thinking, layout) == want
    for i in range(1, len(text)):
        assert run([text[:i], text[i:]], starts_in_think, thinking, layout) == want, i


def test_grammar_padding_is_layout_not_value():
    """Under the tool grammar xgrammar's glm_xml allows one blank each side of a value: the parser of a
    grammar-constrained request drops exactly that, so an enum written " fast\\n" is "fast"."""
    text = call("run", [("mode", " fast\n"), ("note", "  two spaces "), ("n", "\t5\n")])
    parsed = get_tool_parser("glm47")(TOOLS, grammar_padding=True).parse(text)
    assert json.loads(parsed.tool_calls[0].arguments_json) == {"mode": "fast", "note": " two spaces", "n": 5}
    unpadded = get_tool_parser("glm47")(TOOLS).parse(text)
    assert json.loads(unpadded.tool_calls[0].arguments_json)["note"] == "  two spaces "
