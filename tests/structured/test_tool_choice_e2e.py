"""tool_choice "required", a named function and parallel_tool_calls false, end to end with both GLM
tool-call parsers: `glmserve up` on the random tiny model (its free text is noise, so each well-formed
call is the grammar's doing), the openai client, streaming and not. Every answer must carry tool_calls
whose arguments validate against the called tool's schema."""

from __future__ import annotations

import json

import pytest

from glmserve.engine.tiny_model import build_tiny_model
from tests.serving.deployment import Deployment

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "set_mode", "parameters": {
        "type": "object", "properties": {"mode": {"enum": ["fast", "slow"]}, "force": {"type": "boolean"}},
        "required": ["mode"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                           "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "Use a tool."}]


@pytest.fixture(scope="module", params=["glm45", "glm47"])
def client(request, tmp_path_factory):
    model_dir = build_tiny_model("glm4_moe", tmp_path_factory.mktemp(request.param) / "model", seed=8,
                                 overrides={"max_position_embeddings": 2048})  # three tools make a long prompt
    args = ("--dtype", "float32", "--tool-call-parser", request.param, "--reasoning-parser", "glm45")
    with Deployment(model_dir, prefill=1, decode=1, extra_args=args, env={"OMP_NUM_THREADS": "1"}) as dep:
        c = openai.OpenAI(base_url=dep.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        yield c, c.models.list().data[0].id


def _calls(client, model, stream: bool, **kwargs) -> list[list[tuple[str, dict]]]:
    """Per choice: [(name, arguments)], each checked against its tool's schema."""
    kwargs = dict(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=120, temperature=1.0, **kwargs)
    out: dict[int, dict[int, list]] = {}
    if stream:
        reasons = {}
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                for tc in c.delta.tool_calls or []:
                    entry = out.setdefault(c.index, {}).setdefault(tc.index, [None, ""])
                    entry[0] = (tc.function and tc.function.name) or entry[0]
                    entry[1] += (tc.function and tc.function.arguments) or ""
                if c.finish_reason:
                    reasons[c.index] = c.finish_reason
        assert set(reasons.values()) == {"tool_calls"}, reasons
    else:
        r = client.chat.completions.create(**kwargs)
        for c in r.choices:
            assert c.finish_reason == "tool_calls", c
            for i, tc in enumerate(c.message.tool_calls or []):
                out.setdefault(c.index, {})[i] = [tc.function.name, tc.function.arguments]
    result = []
    for index in sorted(out):
        calls = [(n, json.loads(a)) for n, a in (out[index][i] for i in sorted(out[index]))]
        for name, args in calls:
            jsonschema.validate(args, SCHEMAS[name])
        result.append(calls)
    return result


@pytest.mark.parametrize("stream", [False, True])
def test_required_gives_valid_calls(client, stream):
    c, model = client
    choices = _calls(c, model, stream, tool_choice="required", n=2, seed=1)
    assert len(choices) == 2 and all(len(calls) >= 1 for calls in choices)


@pytest.mark.parametrize("stream", [False, True])
def test_required_without_parallel_calls_gives_exactly_one(client, stream):
    c, model = client
    for seed in range(3):
        choices = _calls(c, model, stream, tool_choice="required", parallel_tool_calls=False, seed=seed)
        assert [len(calls) for calls in choices] == [1]


@pytest.mark.parametrize("stream", [False, True])
def test_named_function_is_the_one_called(client, stream):
    c, model = client
    for name in ("set_mode", "get_time"):
        choices = _calls(c, model, stream, tool_choice={"type": "function", "function": {"name": name}}, seed=4)
        assert [[n for n, _ in calls] for calls in choices] == [[name]]


def test_tool_choice_errors_are_400s(client):
    c, model = client
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        c.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS,
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="cannot be combined"):
        c.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                  response_format={"type": "json_object"})
