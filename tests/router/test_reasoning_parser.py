"""GLM reasoning parser: expected split, streaming at every split equals non-streaming, and chaining
into the tool-call parser the way the router does."""

from __future__ import annotations

import json

import pytest

from glmserve.router.reasoning_parser import Glm45ReasoningParser, get_reasoning_parser
from glmserve.router.tool_parsers import get_tool_parser, merge_events

# name -> (thinking enabled, model output, expected (reasoning, content))
CASES = {
    # GLM-4.5 writes "\n<think>" itself and a newline before the content.
    "glm45_reasoning_then_content": (True, "\n<think>Let me think.\nStep 2.</think>\nThe answer is 4.",
                                     ("Let me think.\nStep 2.", "The answer is 4.")),
    # GLM-4.7's template opened <think> in the prompt.
    "starts_inside_thinking": (True, "Reasoning here</think>Answer", ("Reasoning here", "Answer")),
    "missing_end_is_all_reasoning": (True, "<think>still thinking <", ("still thinking <", "")),
    "no_tags_is_reasoning": (True, "Just text", ("Just text", "")),
    "empty_thinking": (True, "<think></think>\n\nHi", (None, "Hi")),
    "unicode": (True, "<think>思考中… 🤔</think>答案是 42 ✅", ("思考中… 🤔", "答案是 42 ✅")),
    "near_miss_tags": (True, "<think>a < b and </thin k> </think", ("a < b and </thin k> </think", "")),
    "only_first_end_counts": (True, "<think>x</think>y</think>z", ("x", "y</think>z")),
    "partial_start_is_text": (True, "<thin", ("<thin", "")),
    "content_keeps_inner_whitespace": (True, "r</think>  a\n b \n", ("r", "a\n b \n")),
    "thinking_disabled": (False, "\nHello <think>x</think> there", (None, "Hello <think>x</think> there")),
}


def stream(parser: Glm45ReasoningParser, pieces: list[str]) -> tuple[str, str]:
    reasoning, content = "", ""
    for piece in pieces:
        r, c = parser.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return reasoning + r, content + c


@pytest.mark.parametrize("case", CASES)
def test_parse_matches_expected(case: str) -> None:
    enabled, text, expected = CASES[case]
    assert Glm45ReasoningParser(thinking_enabled=enabled).parse(text) == expected


@pytest.mark.parametrize("case", CASES)
def test_streaming_at_every_split_equals_parse(case: str) -> None:
    enabled, text, expected = CASES[case]
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        reasoning, content = stream(Glm45ReasoningParser(thinking_enabled=enabled), pieces)
        assert (reasoning or None, content) == expected, pieces


def test_partial_end_tag_is_never_emitted() -> None:
    parser = Glm45ReasoningParser()
    assert parser.feed("<think>abc</thi") == ("abc", "")
    assert parser.feed("nk>def") == ("", "def")
    parser = Glm45ReasoningParser()
    assert parser.feed("abc</th") == ("abc", "")
    assert parser.feed("x") == ("</thx", "")


def test_registry() -> None:
    assert get_reasoning_parser("glm45") is Glm45ReasoningParser
    with pytest.raises(ValueError, match="glm45"):
        get_reasoning_parser("deepseek_r1")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}}}}}]

# Reasoning followed by one tool call, in both models' layouts.
CHAINED = {
    "glm45": "\n<think>I should call the tool.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
             "<arg_value>Zürich</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
    "glm47": "I should call the tool.</think><tool_call>get_weather<arg_key>city</arg_key>"
             "<arg_value>Zürich</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>",
}


@pytest.mark.parametrize("style", CHAINED)
def test_reasoning_then_tool_call_at_every_split(style: str) -> None:
    text = CHAINED[style]
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        reasoning_parser, tool_parser = Glm45ReasoningParser(), get_tool_parser(style)(TOOLS)
        reasoning, events = "", []
        for piece in pieces:  # as the router chains them: reasoning first, its content to the tools
            r, c = reasoning_parser.feed(piece)
            reasoning += r
            events += tool_parser.feed(c)
        r, c = reasoning_parser.finish()
        events += tool_parser.feed(c) + tool_parser.finish()
        reasoning += r
        result = merge_events(events)
        assert reasoning == "I should call the tool.", pieces
        assert result.content == ""
        assert [(t.name, json.loads(t.arguments_json)) for t in result.tool_calls] == [
            ("get_weather", {"city": "Zürich", "days": 2})]
