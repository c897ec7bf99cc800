"""End to end through `glmserve up` (1 prefill + 2 decode workers as separate processes), driven by the
official `openai` client and compared with the single-process engine on the same weights."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import openai
import pytest

from glmserve import LLM, SamplingParams
from glmserve.engine.tiny_model import build_tiny_model
from tests.serving.deployment import Deployment

ARCHS = ["glm4_moe", "glm4_moe_lite"]


@pytest.fixture(scope="module", params=ARCHS)
def served(request, tmp_path_factory):
    model_dir = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param) / "model", seed=11)
    reference = LLM(str(model_dir), dtype="float32", show_progress=False)
    with Deployment(model_dir, prefill=1, decode=2, extra_args=("--dtype", "float32")) as dep:
        client = openai.OpenAI(base_url=dep.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        yield dep, client, model, reference


def _reference_ids(reference: LLM, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = reference.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_completion_matches_single_process_engine(served):
    dep, client, model, reference = served
    prompt = list(range(30, 47))
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = resp.choices[0]
    assert choice.model_extra["token_ids"] == _reference_ids(reference, [prompt], [20])[0]
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == 20
    assert choice.finish_reason == "length"


def test_chat_stream_joins_into_the_non_streaming_answer(served):
    dep, client, model, reference = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about GLM"}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
    text, ids, usage, finish = "", [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            ids += c.model_extra.get("token_ids") or []
            finish = c.finish_reason or finish
    assert text == full.choices[0].message.content
    assert ids == full.choices[0].model_extra["token_ids"]
    assert finish == "length" and usage.completion_tokens == 24 == full.usage.completion_tokens
    # And the prompt the router rendered, continued by the single-process engine, gives the same tokens.
    prompt_ids = full.model_extra["prompt_token_ids"]
    assert ids == _reference_ids(reference, [prompt_ids], [24])[0]


def test_32_concurrent_mixed_length_requests(served):
    dep, client, model, reference = served
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 900) for _ in range(rng.randint(2, 80))] for _ in range(32)]
    lengths = [rng.randint(3, 24) for _ in prompts]
    expected = _reference_ids(reference, prompts, lengths)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=dep.base_url + "/v1", api_key="none", max_retries=0, timeout=300)
        tasks = [aclient.completions.create(model=model, prompt=p, max_tokens=n, temperature=0,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
                 for p, n in zip(prompts, lengths)]
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert [r.choices[0].model_extra["token_ids"] for r in results] == expected


def test_seeded_sampling_n_and_logprobs(served):
    dep, client, model, reference = served
    kw = dict(model=model, prompt="hello", max_tokens=8, temperature=0.9, seed=42, n=2, logprobs=3,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].model_extra["token_ids"] != a.choices[1].model_extra["token_ids"]
    lp = a.choices[0].logprobs
    # Completions key top logprobs by token text, so byte tokens that print alike may merge.
    assert len(lp.tokens) == 8 and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy picks the top token
    # The same seed in the single-process engine gives the same tokens (seed i+0 for choice 0).
    ref = reference.generate("hello", SamplingParams(temperature=0.9, seed=42, max_tokens=8, ignore_eos=True))
    assert a.choices[0].model_extra["token_ids"] == ref[0].outputs[0].token_ids


def test_stop_strings_and_lightllm_generate(served):
    dep, client, model, reference = served
    base = client.completions.create(model=model, prompt="abc", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = text[3:6]
    if stop.strip() and "\ufffd" not in stop:
        cut = client.completions.create(model=model, prompt="abc", max_tokens=12, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]
    r = httpx.post(dep.base_url + "/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 12,
                                                                                    "ignore_eos": True}}, timeout=60)
    assert r.status_code == 200 and r.json()["generated_text"] == [text]
    with httpx.stream("POST", dep.base_url + "/generate_stream",
                      json={"inputs": "abc", "parameters": {"max_new_tokens": 12, "ignore_eos": True}}, timeout=60) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    # LightLLM's stream: text arrives token by token; generated_text stays null, the last event is finished.
    assert events[-1]["finished"] and "".join(e["token"]["text"] for e in events) == text
    assert [e["token"]["count_output_tokens"] for e in events if e["token"]["id"] is not None] == list(range(1, 13))


def _worker_loads(dep) -> dict:
    return httpx.get(dep.base_url + "/load", timeout=10).json()


def test_client_disconnect_frees_every_kv_block(served):
    dep, client, model, reference = served

    async def start_and_abandon():
        aclient = openai.AsyncOpenAI(base_url=dep.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        streams = [await aclient.completions.create(model=model, prompt=list(range(5, 5 + 40 + i)), max_tokens=400,
                                                    temperature=0, stream=True, extra_body={"ignore_eos": True})
                   for i in range(6)]
        for s in streams:
            async for _ in s:
                break  # one chunk, then the client goes away
        for s in streams:
            await s.close()

    asyncio.run(start_and_abandon())
    deadline = time.monotonic() + 15
    while True:
        loads = _worker_loads(dep)
        busy = {k: v["load"] for k, v in loads.items()
                if v["load"] and (v["load"].get("kv_usage", 0) > 0 or v["load"].get("running_requests", 0) > 0)}
        if not busy:
            break
        assert time.monotonic() < deadline, f"KV blocks still held after disconnect: {busy}"
        time.sleep(0.3)
    assert len(loads) == 3


@pytest.mark.parametrize("body, status, fragment", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"messages": [], "max_tokens": 4}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "context length"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"}, 404, "does not exist"),
    ({"messages": "hi"}, 400, "messages"),
])
def test_bad_chat_input_gets_openai_error(served, body, status, fragment):
    dep = served[0]
    r = httpx.post(dep.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"].lower() or fragment in (err.get("param") or "")


@pytest.mark.parametrize("payload, fragment", [
    (b"{not json", "malformed json"),
    (json.dumps({"prompt": [10 ** 9], "max_tokens": 2}).encode(), "out of range"),
    (json.dumps({"prompt": list(range(600)), "max_tokens": 2}).encode(), "context length"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
])
def test_bad_completion_input_gets_400(served, payload, fragment):
    dep = served[0]
    r = httpx.post(dep.base_url + "/v1/completions", content=payload, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"].lower()


def test_openai_client_raises_typed_errors(served):
    dep, client, model, reference = served
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", max_tokens=5, top_p=2.0)


def _worker_counter(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_second_turn_moves_only_the_blocks_the_decode_worker_lacks(served):
    dep, client, model, reference = served
    decode_urls = [ready.rsplit("/", 1)[0] for name, (_, ready, _) in dep.processes.items() if name.startswith("decode")]
    rng = random.Random(99)
    turn1 = [rng.randrange(1, 250) for _ in range(70)]

    def ask(prompt, n):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        return r.choices[0].model_extra["token_ids"]

    def totals():
        return (sum(_worker_counter(u, "glmserve:kv_transfer_reused_tokens_total") for u in decode_urls),
                sum(_worker_counter(u, 'glmserve:kv_transfer_bytes_total') for u in decode_urls))

    reused0, bytes0 = totals()
    out1 = ask(turn1, 20)
    reused1, bytes1 = totals()
    assert reused1 == reused0  # nothing cached yet for this conversation
    per_token = (bytes1 - bytes0) / len(turn1)
    # The router learns of the decode worker's new blocks from its KV events within a poll or two.
    deadline = time.monotonic() + 10
    while not any(v.get("cached_blocks") for k, v in _worker_loads(dep).items() if k.startswith("decode")):
        assert time.monotonic() < deadline, _worker_loads(dep)
        time.sleep(0.2)
    turn2 = turn1 + out1 + [rng.randrange(1, 250) for _ in range(30)]
    out2 = ask(turn2, 16)
    reused2, bytes2 = totals()
    # D holds the KV of turn 1's prompt and of every generated token but the last: 89 tokens, 5 full blocks.
    block = 16
    expected_reused = min((len(turn1) + len(out1) - 1) // block, (len(turn2) - 1) // block) * block
    assert reused2 - reused1 == expected_reused == 80
    assert bytes2 - bytes1 == pytest.approx(per_token * (len(turn2) - expected_reused), rel=0.01)
    assert [out1, out2] == _reference_ids(reference, [turn1, turn2], [20, 16])
