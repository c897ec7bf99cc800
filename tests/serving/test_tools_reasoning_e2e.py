"""Tool calls and reasoning end to end: a tiny model trained to reproduce fixed GLM replies, served by
`glmserve up` (1 prefill + 1 decode) and queried with the official openai client, streaming and not.

The parsers are exercised on text the model really generated, token by token, through prefill, the KV
transfer, decode and the router's detokenizer; the request's own rendering of the chat template (tools,
chat_template_kwargs, tool_choice) decides which reply the model gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from glmserve.engine.tokenizer import Tokenizer
from tests.serving.deployment import Deployment, http_status, pid_alive
from tests.serving.trained_model import CONVERSATIONS, prompt_ids, reply_ids

openai = pytest.importorskip("openai")

MAX_TOKENS = 128  # the longest reply is under 100 tokens


@pytest.fixture(scope="module")
def deployment(trained_dir):
    args = ("--tool-call-parser", "glm47", "--reasoning-parser", "glm45", "--dtype", "float32")
    # One thread per process: three processes share a small CPU.
    with Deployment(trained_dir, prefill=1, decode=1, extra_args=args, env={"OMP_NUM_THREADS": "1"}) as d:
        yield d
    # Ctrl-C semantics: the launcher exits cleanly and takes its workers with it.
    assert d.returncode == 0, d.log[-4000:]
    assert not [name for name, (pid, _, _) in d.processes.items() if pid_alive(pid)]


@pytest.fixture(scope="module")
def client(deployment):
    return openai.OpenAI(base_url=deployment.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tok(trained_dir):
    return Tokenizer(trained_dir)


@dataclass(frozen=True)
class Expected:
    content: str | None
    reasoning: str | None
    calls: list = field(default_factory=list)  # [(name, arguments as a dict)]
    finish_reason: str = "stop"


WEATHER_ARGS = {"city": "Paris", "days": 3}
NAMED_WEATHER = {"type": "function", "function": {"name": "get_weather"}}

# case -> (trained conversation, extra request fields, expected message)
CASES = {
    "reasoning": ("reasoning", {}, Expected("Because of scattering.", "Light scatters in air.")),
    "glm47_call": ("glm47_call", {}, Expected(None, "The user wants a forecast.", [("get_weather", WEATHER_ARGS)],
                                              "tool_calls")),
    "glm45_call": ("glm45_call", {}, Expected(
        "Saving the config.", "Tags and options are needed.",
        [("set_config", {"tags": ["fast", "small"], "options": {"level": 2, "debug": True}})], "tool_calls")),
    "no_thinking": ("no_thinking", {}, Expected("Blue light scatters most.", None)),
    # Same generation as glm47_call, but the call is left in the content, unparsed.
    "tool_choice_none": ("glm47_call", {"tool_choice": "none"}, Expected(
        CONVERSATIONS["glm47_call"].reply.split("</think>")[1], "The user wants a forecast.")),
    # The router closes <think>; the grammar allows only one get_weather call, which the model writes.
    "named_tool_choice": ("named_choice", {"tool_choice": NAMED_WEATHER},
                          Expected(None, None, [("get_weather", WEATHER_ARGS)], "tool_calls")),
    "required_single_call": ("named_choice", {"tool_choice": "required", "parallel_tool_calls": False},
                             Expected(None, None, [("get_weather", WEATHER_ARGS)], "tool_calls")),
    # A call written inside the thinking block is a call, not reasoning text.
    "call_inside_thinking": ("call_in_think", {}, Expected(None, "Need the weather first.",
                                                          [("get_weather", WEATHER_ARGS)], "tool_calls")),
}


def request_kwargs(model: str, conversation: str, extra: dict) -> dict:
    conv = CONVERSATIONS[conversation]
    kwargs = dict(model=model, messages=conv.messages, temperature=0, max_tokens=MAX_TOKENS, **extra)
    if conv.tools:
        kwargs["tools"] = conv.tools
    body = {"return_token_ids": True}
    if conv.chat_template_kwargs:
        body["chat_template_kwargs"] = conv.chat_template_kwargs
    kwargs["extra_body"] = body
    return kwargs


def summary(content, reasoning, calls, finish_reason) -> dict:
    """The parts streaming and non-streaming must agree on; None and "" are the same text here."""
    return {"content": content or "", "reasoning": reasoning or "", "calls": calls, "finish_reason": finish_reason}


def chat_once(client, kwargs) -> tuple[dict, object]:
    resp = client.chat.completions.create(**kwargs)
    choice = resp.choices[0]
    msg = choice.message
    calls = [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
    for c in msg.tool_calls or []:
        assert c.type == "function" and c.id
    return summary(msg.content, getattr(msg, "reasoning_content", None), calls, choice.finish_reason), resp


def chat_streamed(client, kwargs) -> dict:
    content, reasoning, finish_reason = [], [], None
    calls: dict[int, dict] = {}
    with client.chat.completions.create(stream=True, **kwargs) as stream:
        for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            delta = choice.delta
            content.append(delta.content or "")
            reasoning.append(getattr(delta, "reasoning_content", None) or "")
            for tc in delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"names": [], "ids": [], "arguments": []})
                if tc.function and tc.function.name:
                    call["names"].append(tc.function.name)
                if tc.id:
                    call["ids"].append(tc.id)
                call["arguments"].append((tc.function and tc.function.arguments) or "")
            if choice.finish_reason is not None:
                assert finish_reason is None, "finish_reason sent twice"
                finish_reason = choice.finish_reason
    for index, call in calls.items():
        # The name (and id) arrive once, in the call's first delta; the rest is argument fragments.
        assert len(call["names"]) == 1 and len(call["ids"]) == 1, (index, call)
    joined = [(c["names"][0], "".join(c["arguments"])) for _, c in sorted(calls.items())]
    return summary("".join(content), "".join(reasoning), joined, finish_reason)


def test_engine_reproduces_each_reply(trained_dir, tok):
    """The saved checkpoint loads in glmserve's engine and greedily yields each reply, then its eos."""
    from glmserve.engine.llm import LLM
    from glmserve.engine.sampling_params import SamplingParams

    convs = list(CONVERSATIONS.values())
    # One thread: on a shared, oversubscribed CPU two threads make this 40x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(str(trained_dir), dtype="float32", show_progress=False)
        outs = llm.generate([{"prompt_token_ids": prompt_ids(tok, c)} for c in convs],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    finally:
        torch.set_num_threads(threads)
    for conv, out in zip(convs, outs):
        assert out.outputs[0].token_ids == reply_ids(tok, conv), out.outputs[0].text
        assert out.outputs[0].text == conv.reply
        assert out.outputs[0].finish_reason == "stop"


def test_deployment_processes_are_up(deployment):
    assert set(deployment.processes) == {"prefill-0", "decode-0", "router"}
    for name, (pid, ready_url, _) in deployment.processes.items():
        assert pid_alive(pid), name
        assert http_status(ready_url) == 200, name
    assert deployment.processes["decode-0"][2] != "-"


@pytest.mark.parametrize("case", list(CASES))
def test_tools_and_reasoning(case, client, model_name, tok):
    conversation, extra, want = CASES[case]
    kwargs = request_kwargs(model_name, conversation, extra)
    got, resp = chat_once(client, kwargs)

    # The router rendered the prompt the model was trained on, and the model answered with its reply.
    conv = CONVERSATIONS[conversation]
    assert resp.prompt_token_ids == prompt_ids(tok, conv)
    assert resp.choices[0].token_ids == reply_ids(tok, conv)

    msg = resp.choices[0].message
    assert msg.content == want.content
    assert getattr(msg, "reasoning_content", None) == want.reasoning
    assert [(name, json.loads(args)) for name, args in got["calls"]] == want.calls
    assert resp.choices[0].finish_reason == want.finish_reason
    if not want.calls:
        assert msg.tool_calls is None or msg.tool_calls == []

    # Streaming: the deltas join into exactly the non-streaming answer (argument fragments included).
    assert chat_streamed(client, kwargs) == got
