"""The Anthropic Messages API (what Claude Code speaks) driven by the official `anthropic` SDK against
`glmserve up` serving the tiny checkpoint trained to reproduce fixed GLM replies (thinking, a GLM-4.7 tool
call, plain content). The same deployment runs with `--api-key` (OpenAI Bearer and Anthropic x-api-key
both accepted, /health open) and `--metrics-compat vllm` (decode workers export vLLM's metric names)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from glmserve.engine.tokenizer import Tokenizer
from tests.serving.deployment import Deployment
from tests.serving.trained_model import CONVERSATIONS, GET_WEATHER, prompt_ids, reply_ids

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

KEY = "sk-test-dropin"
MAX_TOKENS = 128
WEATHER_TOOL = {"name": "get_weather", "description": GET_WEATHER["function"]["description"],
                "input_schema": GET_WEATHER["function"]["parameters"]}


@pytest.fixture(scope="module")
def deployment(trained_dir):
    args = ("--tool-call-parser", "glm47", "--reasoning-parser", "glm45", "--dtype", "float32", "--api-key", KEY,
            "--metrics-compat", "vllm")
    with Deployment(trained_dir, prefill=1, decode=1, extra_args=args, env={"OMP_NUM_THREADS": "1"}) as d:
        yield d


@pytest.fixture(scope="module")
def client(deployment):
    return anthropic.Anthropic(base_url=deployment.base_url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(deployment):
    oa = openai.OpenAI(base_url=deployment.base_url + "/v1", api_key=KEY, max_retries=0)
    return oa.models.list().data[0].id  # a Bearer key opens the OpenAI side


@pytest.fixture(scope="module")
def tok(trained_dir):
    return Tokenizer(trained_dir)


def _blocks(message) -> list[tuple]:
    out = []
    for b in message.content:
        if b.type == "thinking":
            out.append(("thinking", b.thinking))
        elif b.type == "text":
            out.append(("text", b.text))
        elif b.type == "tool_use":
            out.append(("tool_use", b.name, b.input))
    return out


# Greedy decoding reproduces the trained replies. The current Messages API has no temperature parameter in
# the SDK any more; the server still takes the field (older clients send it), so it goes in extra_body.
GREEDY = {"temperature": 0}


def _ask(client, model, stream: bool, **kwargs):
    kwargs = dict(model=model, max_tokens=MAX_TOKENS, extra_body=GREEDY, **kwargs)
    if not stream:
        return client.messages.create(**kwargs), None
    with client.messages.stream(**kwargs) as s:
        events = [e.type for e in s]
        return s.get_final_message(), events


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
def test_thinking_then_text(client, model, tok, stream):
    conv = CONVERSATIONS["reasoning"]
    msg, events = _ask(client, model, stream, messages=conv.messages)
    assert _blocks(msg) == [("thinking", "Light scatters in air."), ("text", "Because of scattering.")]
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None and msg.role == "assistant"
    assert msg.usage.input_tokens == len(prompt_ids(tok, conv))
    assert msg.usage.output_tokens == len(reply_ids(tok, conv))
    if stream:
        assert events[0] == "message_start" and "thinking" in events and "text" in events


def test_thinking_disabled_and_system_prompt(client, model, tok):
    conv = CONVERSATIONS["no_thinking"]
    msg, _ = _ask(client, model, False, messages=conv.messages, thinking={"type": "disabled"})
    assert _blocks(msg) == [("text", "Blue light scatters most.")]
    # A system prompt is rendered as GLM's system turn: the prompt grows by exactly that turn.
    with_system = client.messages.count_tokens(model=model, system="Be brief.", messages=conv.messages,
                                               thinking={"type": "disabled"}).input_tokens
    expected = tok.encode(tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *conv.messages],
                                                  enable_thinking=False))
    assert with_system == len(expected)


def test_stop_sequence(client, model):
    msg, _ = _ask(client, model, False, messages=CONVERSATIONS["reasoning"].messages, stop_sequences=["scattering"])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "scattering"
    assert _blocks(msg) == [("thinking", "Light scatters in air."), ("text", "Because of ")]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
def test_tool_use_round_trip(client, model, trained_dir, stream):
    from transformers import AutoTokenizer

    conv = CONVERSATIONS["glm47_call"]
    msg, events = _ask(client, model, stream, messages=conv.messages, tools=[WEATHER_TOOL])
    assert _blocks(msg) == [("thinking", "The user wants a forecast."),
                            ("tool_use", "get_weather", {"city": "Paris", "days": 3})]
    assert msg.stop_reason == "tool_use"
    if stream:
        assert "input_json" in events
    call = msg.content[-1]
    # Send the call back with its result, as an agent does; the prompt must equal transformers' rendering
    # of the same conversation in OpenAI form.
    history = [*conv.messages, {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 C"}]}]
    openai_form = [*conv.messages,
                   {"role": "assistant", "content": "", "reasoning_content": "The user wants a forecast.",
                    "tool_calls": [{"id": call.id, "type": "function",
                                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]},
                   {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
    hf = AutoTokenizer.from_pretrained(trained_dir)
    expected = hf.apply_chat_template(openai_form, tools=[GET_WEATHER], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
    assert client.messages.count_tokens(model=model, messages=history, tools=[WEATHER_TOOL]).input_tokens == len(expected)
    follow_up = client.messages.create(model=model, max_tokens=8, extra_body=GREEDY, messages=history, tools=[WEATHER_TOOL])
    assert follow_up.usage.input_tokens == len(expected) and follow_up.stop_reason in ("end_turn", "max_tokens",
                                                                                        "tool_use")


def test_named_tool_choice(client, model):
    msg, _ = _ask(client, model, False, messages=CONVERSATIONS["named_choice"].messages, tools=[WEATHER_TOOL],
                  tool_choice={"type": "tool", "name": "get_weather"})
    assert _blocks(msg) == [("tool_use", "get_weather", {"city": "Paris", "days": 3})]
    assert msg.stop_reason == "tool_use"


def test_errors_are_anthropic_shaped(client, model):
    with pytest.raises(anthropic.BadRequestError, match="image"):
        client.messages.create(model=model, max_tokens=8, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                       "data": "AAAA"}}]}])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model=model, max_tokens=0, messages=[{"role": "user", "content": "hi"}])


def test_api_key(deployment):
    base = deployment.base_url
    assert httpx.get(base + "/health").status_code == 200  # probes need no key
    assert httpx.get(base + "/v1/models").status_code == 401
    assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = httpx.post(base + "/generate", json={"inputs": "hi"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
            model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}])


def _samples(url: str) -> dict[str, list]:
    text = httpx.get(url, timeout=10).text
    return {s.name: s for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_decode_worker_exports_vllm_metric_names(deployment, client, model):
    _ask(client, model, False, messages=CONVERSATIONS["reasoning"].messages)
    (ready,) = [url for name, (_, url, _) in deployment.processes.items() if name.startswith("decode")]
    s = _samples(ready.rsplit("/", 1)[0] + "/metrics")
    pairs = {"vllm:num_requests_running": "glmserve:num_requests_running",
             "vllm:num_requests_waiting": "glmserve:num_requests_waiting",
             "vllm:kv_cache_usage_perc": "glmserve:kv_cache_usage_perc",
             "vllm:gpu_cache_usage_perc": "glmserve:kv_cache_usage_perc",
             "vllm:generation_tokens_total": "glmserve:generation_tokens_total",
             "vllm:prefix_cache_queries_total": "glmserve:prefix_cache_queries_total"}
    for vllm_name, ours in pairs.items():
        assert s[vllm_name].value == s[ours].value, vllm_name
        assert s[vllm_name].labels["model_name"] == s[ours].labels["model_name"]
    assert s["vllm:generation_tokens_total"].value > 0
    info = s["vllm:cache_config_info"]
    assert info.value == 1 and info.labels["block_size"] == "16" and int(info.labels["num_gpu_blocks"]) > 0
