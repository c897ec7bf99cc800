"""Chat rendering: byte-equal to transformers' apply_chat_template on the tiny GLM-4.7-format template, the
GLM markers in the right places, and the jinja environment's transformers semantics."""

from __future__ import annotations

import copy
import json

import pytest

from glmserve.engine.chat_template import ChatTemplateError, normalize_messages, render_chat_template
from glmserve.engine.tiny_tokenizer import TINY_ASSETS_DIR
from glmserve.engine.tokenizer import Tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Aktuelles Wetter für eine Stadt",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]},
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _call(name: str, args: dict, as_string: bool) -> dict:
    return {"id": f"call_{name}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


def _tool_turns(as_string: bool) -> list[dict]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Köln and the time?"},
        {"role": "assistant", "content": None, "reasoning_content": "Two tools needed.",
         "tool_calls": [_call("get_weather", {"city": "Köln", "days": 3, "opts": {"unit": "C"}}, as_string),
                        _call("get_time", {}, as_string)]},
        {"role": "tool", "tool_call_id": "call_get_weather", "content": "{\"temp\": 21}"},
        {"role": "tool", "tool_call_id": "call_get_time", "content": "12:00"},
    ]


MULTI_TURN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "old reasoning"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "<think>\ninline plan\n</think>\n\n6"},
    {"role": "assistant", "content": "Anything else?", "reasoning_content": "  new reasoning  "},
]

CASES = {
    "user_only": ([{"role": "user", "content": "hi"}], None, {}),
    "system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}], None, {}),
    "content_parts": ([{"role": "user", "content": [{"type": "text", "text": "part one, "},
                                                    {"type": "image"}, {"type": "text", "text": "part two"}]}],
                      None, {}),
    "tools": ([{"role": "user", "content": "weather?"}], [WEATHER_TOOL, TIME_TOOL], {}),
    "tool_calls_and_results": (_tool_turns(False), [WEATHER_TOOL, TIME_TOOL], {}),
    "tool_result_list": ([{"role": "user", "content": "q"},
                          {"role": "tool", "content": [{"output": "a"}, "b"]}], None, {}),
    "multi_turn_reasoning": (MULTI_TURN, None, {}),
    "keep_all_reasoning": (MULTI_TURN, None, {"clear_thinking": False}),
    "thinking_off": (MULTI_TURN[:3], None, {"enable_thinking": False}),
    "thinking_on": (MULTI_TURN[:3], None, {"enable_thinking": True}),
}


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer(TINY_ASSETS_DIR)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TINY_ASSETS_DIR))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rendering_matches_transformers(ours, hf, case, add_generation_prompt):
    messages, tools, kwargs = CASES[case]
    expected = hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                      add_generation_prompt=add_generation_prompt, **kwargs)
    got = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
    assert got == expected
    assert got.startswith("[gMASK]<sop>")


def test_string_arguments_render_like_dict_arguments(ours, hf):
    tools = [WEATHER_TOOL, TIME_TOOL]
    as_string = _tool_turns(True)
    before = copy.deepcopy(as_string)
    expected = hf.apply_chat_template(_tool_turns(False), tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(as_string, tools=tools) == expected
    assert as_string == before  # the caller's messages are not modified


def test_glm_markers(ours):
    text = ours.apply_chat_template(_tool_turns(True), tools=[WEATHER_TOOL])
    tool_json = json.dumps(WEATHER_TOOL, ensure_ascii=False)
    assert text.startswith("[gMASK]<sop><|system|>\n# Tools\n\nYou may call one or more functions")
    assert f"<tools>\n{tool_json}\n</tools>\n\n" in text
    assert "für" in text and "\\u00fc" not in text  # tojson keeps non-ASCII
    assert ("<arg_value>{arg-value-2}</arg_value>...</tool_call><|system|>You are terse."
            "<|user|>Weather in Köln and the time?") in text
    # Reasoning of the turn after the last user message is kept; no "None" from content=None.
    assert ("<|assistant|><think>Two tools needed.</think><tool_call>get_weather<arg_key>city</arg_key>"
            "<arg_value>Köln</arg_value><arg_key>days</arg_key><arg_value>3</arg_value><arg_key>opts</arg_key>"
            "<arg_value>{\"unit\": \"C\"}</arg_value></tool_call><tool_call>get_time</tool_call>") in text
    # One <|observation|> for consecutive tool results.
    assert ("</tool_call><|observation|><tool_response>{\"temp\": 21}</tool_response>"
            "<tool_response>12:00</tool_response><|assistant|><think>") in text
    assert text.endswith("<|assistant|><think>") and "None" not in text


def test_reasoning_history_and_thinking_switch(ours):
    text = ours.apply_chat_template(MULTI_TURN, add_generation_prompt=False)
    assert "<|user|>What is 2+2?<|assistant|></think>4<|user|>And 3+3?" in text  # old reasoning dropped
    assert "<|assistant|><think>inline plan</think>6" in text  # parsed out of content, kept
    assert text.endswith("<|assistant|><think>new reasoning</think>Anything else?")
    kept = ours.apply_chat_template(MULTI_TURN, add_generation_prompt=False, clear_thinking=False)
    assert "<|assistant|><think>old reasoning</think>4" in kept
    off = ours.apply_chat_template(MULTI_TURN[:1], enable_thinking=False)
    assert off == "[gMASK]<sop><|user|>What is 2+2?<|assistant|></think>"
    assert ours.apply_chat_template(MULTI_TURN[:1], enable_thinking=True).endswith("<|assistant|><think>")


def test_reasoning_aliases_become_reasoning_content(ours):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "because"}]
    assert ours.apply_chat_template(msgs, add_generation_prompt=False).endswith("<think>because</think>a")
    norm = normalize_messages(msgs)[1]
    assert norm["reasoning_content"] == norm["thinking"] == "because"


def test_invalid_argument_json_is_a_clear_error(ours):
    msgs = [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]
    with pytest.raises(ChatTemplateError, match="not valid JSON"):
        ours.apply_chat_template(msgs)


# -- the jinja environment behaves like transformers' ------------------------------------------------
ENV_TEMPLATES = [
    "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2, sort_keys=True) }}"
    "|{{ messages | tojson(separators=(',', ':')) }}",
    "{% for m in messages %}\n    {% if loop.index > 1 %}{% break %}{% endif %}\n  [{{ m.role }}]\n{% endfor %}\n"
    "{% for m in messages %}{% if m.role == 'user' %}{% continue %}{% endif %}{{ m.content }}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    "{{ dict(a=1) | tojson }}{{ bos_token is defined }}{{ eos_token }}{{ custom_flag }}",
    "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    "{% if add_generation_prompt %}GEN{% endif %}{{ tools | length if tools else 0 }}",
]
ENV_MESSAGES = [{"role": "user", "content": "héllo <b>&</b>"}, {"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize("source", ENV_TEMPLATES)
def test_environment_matches_transformers(ours, hf, source):
    kwargs = {"custom_flag": "X"}
    expected = hf.apply_chat_template(ENV_MESSAGES, chat_template=source, tools=[TIME_TOOL], tokenize=False,
                                      add_generation_prompt=True, **kwargs)
    got = render_chat_template(source, ENV_MESSAGES, tools=[TIME_TOOL], add_generation_prompt=True,
                               special_tokens=ours.special_tokens_map, **kwargs)
    assert got == expected
    assert "&lt;" not in got  # no HTML escaping anywhere


def test_raise_exception_and_strftime_now():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [])
    year = render_chat_template("{{ strftime_now('%Y') }}", [])
    assert year.isdigit() and len(year) == 4


def test_sandbox_blocks_python_internals():
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        render_chat_template("{% set ns = namespace(_x=1) %}", [])
    with pytest.raises(ChatTemplateError):  # immutable: templates cannot mutate the inputs
        render_chat_template("{{ messages.append(1) }}", [])


def test_special_tokens_and_kwargs_reach_the_template():
    out = render_chat_template("{{ bos_token }}|{{ eos_token }}|{{ enable_thinking }}", [],
                               special_tokens={"bos_token": "<s>", "eos_token": "</s>"}, enable_thinking=False,
                               eos_token="<override>")
    assert out == "<s>|<override>|False"
