"""GLM tool-call parsers: expected structure, and streaming at every split equals non-streaming."""

from __future__ import annotations

import json

import pytest

from glmserve.router.tool_parsers import (
    DeltaEvent,
    Glm45ToolParser,
    Glm47ToolParser,
    ParsedToolCalls,
    get_tool_parser,
    merge_events,
)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {"name": "set_config", "parameters": {"type": "object", "properties": {
        "ratio": {"type": "number"}, "enabled": {"type": "boolean"}, "tags": {"type": "array"},
        "options": {"type": "object"}, "note": {"type": ["string", "null"]}, "code": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


def render(style: str, name: str, args: list[tuple[str, str]]) -> str:
    """A call as the model writes it (layouts from the GLM-4.5 and GLM-4.7 chat templates)."""
    if style == "glm45":
        pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in args)
        return f"<tool_call>{name}\n{pairs}</tool_call>"
    pairs = "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in args)
    return f"<tool_call>{name}{pairs}</tool_call>"


def sep(style: str) -> str:
    return "\n" if style == "glm45" else ""


# name -> (text builder for a style, expected content, expected [(name, arguments dict)])
CASES = {
    "content_only": (lambda s: "Hello, world! 你好 <b>bold</b> a < b, <tool> and </tool_call> stay.\n",
                     "Hello, world! 你好 <b>bold</b> a < b, <tool> and </tool_call> stay.\n", []),
    "content_before_call": (
        lambda s: "Let me check the weather.\n" + render(s, "get_weather", [("city", "Beijing"), ("days", "3")]),
        "Let me check the weather.", [("get_weather", {"city": "Beijing", "days": 3})]),
    "typed_values": (
        lambda s: render(s, "get_weather", [("city", "北京 🌧"), ("days", "7"), ("unit", "celsius")]) + sep(s)
        + render(s, "set_config", [("ratio", "0.75"), ("enabled", "true"), ("tags", '["a", "b"]'),
                                   ("options", '{"x": 1, "y": [null, "<z>"]}'), ("note", '{"looks": "json"}'),
                                   ("code", "if a < b:\n    print('hi')\n")]),
        "",
        [("get_weather", {"city": "北京 🌧", "days": 7, "unit": "celsius"}),
         ("set_config", {"ratio": 0.75, "enabled": True, "tags": ["a", "b"], "options": {"x": 1, "y": [None, "<z>"]},
                         "note": '{"looks": "json"}', "code": "if a < b:\n    print('hi')\n"})]),
    "string_schema_keeps_json_looking_text": (
        lambda s: render(s, "get_weather", [("city", "123"), ("unit", '"celsius"'), ("days", "three")]),
        "", [("get_weather", {"city": "123", "unit": '"celsius"', "days": "three"})]),
    "unknown_tool_decodes_json_or_keeps_text": (
        lambda s: render(s, "mystery", [("a", "1"), ("b", "not json"), ("c", "NaN"), ("d", "null")]),
        "", [("mystery", {"a": 1, "b": "not json", "c": "NaN", "d": None})]),
    "call_without_arguments_then_content": (
        lambda s: "Sure." + render(s, "get_time", []) + "\nDone.",
        "Sure.\nDone.", [("get_time", {})]),
    "malformed_calls_stay_content": (
        lambda s: 'Use <tool_call> tags. <tool_call>{"name": "f"}</tool_call> <tool_call>a b</tool_call>',
        'Use <tool_call> tags. <tool_call>{"name": "f"}</tool_call> <tool_call>a b</tool_call>', []),
    # Cut off by max_tokens: never a half-written call; the text comes back as content.
    "unterminated_call_is_content": (
        lambda s: "Checking." + render(s, "get_weather", [("days", "2"), ("city", "Par")])[: -len(
            f"</arg_value>{sep(s)}</tool_call>")],
        "Checking.{CUT}", []),
}

STYLES = ["glm45", "glm47"]


def summary(result: ParsedToolCalls) -> tuple[str, list[tuple[str, dict]]]:
    for call in result.tool_calls:
        assert call.id.startswith("call_") and len(call.id) > 10
    return result.content, [(c.name, json.loads(c.arguments_json)) for c in result.tool_calls]


def run_stream(parser_cls, pieces: list[str]) -> tuple[ParsedToolCalls, list[DeltaEvent]]:
    parser = parser_cls(TOOLS)
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return merge_events(events), events


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", CASES)
def test_parse_matches_expected(style: str, case: str) -> None:
    build, content, calls = CASES[case]
    if content.endswith("{CUT}"):  # the cut-off call's own text
        content = content[: -len("{CUT}")] + build(style)[len(content) - len("{CUT}"):]
    result = get_tool_parser(style)(TOOLS).parse(build(style))
    assert summary(result) == (content, calls)
    for call, (_, args) in zip(result.tool_calls, calls):  # exact text, key order kept
        assert call.arguments_json == json.dumps(args, ensure_ascii=False)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", CASES)
def test_streaming_at_every_split_equals_parse(style: str, case: str) -> None:
    text = CASES[case][0](style)
    parser_cls = get_tool_parser(style)
    expected = parser_cls(TOOLS).parse(text)
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        merged, events = run_stream(parser_cls, pieces)
        assert summary(merged) == summary(expected), pieces
        assert [c.arguments_json for c in merged.tool_calls] == [c.arguments_json for c in expected.tool_calls]
        # Each call opens with exactly one event carrying id and name, before its fragments.
        for index in range(len(merged.tool_calls)):
            mine = [ev for ev in events if ev.kind == "tool_call" and ev.index == index]
            assert mine[0].id and mine[0].name and all(ev.id is None and ev.name is None for ev in mine[1:])


def test_both_styles_are_registered() -> None:
    assert get_tool_parser("glm45") is Glm45ToolParser
    assert get_tool_parser("glm47") is Glm47ToolParser
    with pytest.raises(ValueError, match="glm45"):
        get_tool_parser("hermes")


def test_no_prefix_of_the_tag_leaks_into_content() -> None:
    text = "Hi there " + render("glm47", "get_time", [])
    for i in range(len(text) + 1):
        parser = Glm47ToolParser(TOOLS)
        content = "".join(ev.text for ev in parser.feed(text[:i]) if ev.kind == "content")
        assert "Hi there".startswith(content), (i, content)


@pytest.mark.parametrize("style", STYLES)
def test_a_call_is_emitted_once_complete(style: str) -> None:
    parser = get_tool_parser(style)(TOOLS)
    assert parser.feed("<tool_call>get_wea") == []
    assert parser.feed("ther" + sep(style) + "<arg_key>city</arg_key><arg_value>San Fran") == []
    assert parser.feed("cisco</arg_value>" + sep(style)) == []
    events = parser.feed("</tool_call>")
    assert [(ev.kind, ev.index, ev.name) for ev in events][0] == ("tool_call", 0, "get_weather")
    assert "".join(ev.arguments or "" for ev in events) == '{"city": "San Francisco"}'


def test_parse_leaves_the_stream_state_alone() -> None:
    parser = Glm45ToolParser(TOOLS)
    parser.feed("Before <tool_ca")
    assert parser.parse("x").content == "x"
    events = parser.feed("ll>get_time\n</tool_call>") + parser.finish()
    assert merge_events(events).tool_calls[0].name == "get_time"


def test_tools_none_decodes_every_value_as_json() -> None:
    result = Glm45ToolParser(None).parse(render("glm45", "f", [("n", "5"), ("s", "text")]))
    assert json.loads(result.tool_calls[0].arguments_json) == {"n": 5, "s": "text"}
