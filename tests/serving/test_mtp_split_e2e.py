"""MTP speculative decoding across the split, through `glmserve up` (1 prefill + 2 decode workers, vLLM's
`--speculative-config` spelling), driven by the official `openai` client: greedy tokens, streamed or not,
equal transformers' and the single-process engine's without MTP; the decode workers count drafts; a client
that leaves mid-stream leaves no KV block held on any worker."""

from __future__ import annotations

import json
import time
import urllib.request

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from glmserve import LLM, SamplingParams
from glmserve.engine.tiny_model import build_tiny_model
from tests.engine.hf_reference import transformers_greedy
from tests.serving.deployment import Deployment

K = 2
NEW = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = build_tiny_model("glm4_moe_lite", tmp_path_factory.mktemp("mtp_split") / "model", seed=5)
    prompts, expected = transformers_greedy(model_dir, (9, 27), NEW, seed=3)
    args = ("--dtype", "float32", "--num-kv-blocks", "64",
            "--speculative-config", json.dumps({"method": "mtp", "num_speculative_tokens": K}))
    with Deployment(model_dir, prefill=1, decode=2, extra_args=args) as dep:
        client = openai.OpenAI(base_url=dep.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
        yield dep, client, client.models.list().data[0].id, model_dir, prompts, expected


def worker_urls(dep, role: str) -> list[str]:
    return [ready.rsplit("/", 1)[0] for name, (_, ready, _) in dep.processes.items() if name.startswith(role)]


def spec_counters(url: str) -> dict[tuple[str, str | None], float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return {(s.name, s.labels.get("position")): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name.startswith("glmserve:spec_decode_") and s.name.endswith("_total")}


def _ids(client, model, prompt, stream: bool) -> list[int]:
    kw = dict(model=model, prompt=prompt, max_tokens=NEW, temperature=0,
              extra_body={"min_tokens": NEW, "return_token_ids": True})
    if not stream:
        return client.completions.create(**kw).choices[0].model_extra["token_ids"]
    ids = []
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            ids += c.model_extra.get("token_ids") or []
    return ids


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_tokens_equal_transformers_and_the_engine_without_mtp(served, stream):
    dep, client, model, model_dir, prompts, expected = served
    plain = LLM(str(model_dir), dtype="float32", show_progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, min_tokens=NEW)
    without_mtp = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert without_mtp == expected
    assert [_ids(client, model, p, stream) for p in prompts] == expected


def test_decode_workers_count_drafts(served):
    dep, client, model, _, prompts, _ = served
    _ids(client, model, prompts[0], stream=False)
    deadline = time.monotonic() + 10
    while True:  # the exporter refreshes at most every 50 ms
        counters = [spec_counters(u) for u in worker_urls(dep, "decode")]
        drafts = sum(c.get(("glmserve:spec_decode_num_drafts_total", None), 0) for c in counters)
        if drafts > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    draft_tokens = sum(c.get(("glmserve:spec_decode_num_draft_tokens_total", None), 0) for c in counters)
    accepted = sum(c.get(("glmserve:spec_decode_num_accepted_tokens_total", None), 0) for c in counters)
    assert drafts > 0 and drafts <= draft_tokens <= K * drafts
    assert 0 <= accepted <= draft_tokens
    assert not spec_counters(worker_urls(dep, "prefill")[0])  # the prefill worker never drafts


def wait_all_blocks_free(dep, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        loads = {u: httpx.get(u + "/load", timeout=10).json() for u in worker_urls(dep, "decode") + worker_urls(dep, "prefill")}
        if all(s["kv_cache_usage_perc"] == 0 and s["num_requests_running"] == 0 and s["num_requests_waiting"] == 0
               for s in loads.values()):
            return
        assert time.monotonic() < deadline, f"KV blocks still held: {loads}"
        time.sleep(0.25)


def test_leaving_at_any_stage_frees_every_block(served):
    """Clients that go away after a random time: queued, during the KV transfer (MTP layer included),
    after the first drafts, mid-decode."""
    import asyncio
    import random

    dep, _, model, _, _, _ = served
    rng = random.Random(7)

    async def one(client, i):
        body = {"model": model, "prompt": [rng.randrange(1, 200) for _ in range(rng.randint(5, 120))],
                "max_tokens": 64, "temperature": 0 if i % 2 else 0.8, "seed": i, "ignore_eos": True, "stream": i % 3 == 0}
        try:
            await asyncio.wait_for(client.post("/v1/completions", json=body), rng.uniform(0.0, 1.5))
        except asyncio.TimeoutError:
            pass

    async def run():
        async with httpx.AsyncClient(base_url=dep.base_url, timeout=120) as client:
            await asyncio.gather(*(one(client, i) for i in range(16)))

    asyncio.run(run())
    wait_all_blocks_free(dep)


def test_leaving_mid_stream_frees_every_block(served):
    dep, client, model, _, prompts, _ = served
    stream = client.completions.create(model=model, prompt=prompts[1] * 3, max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    received = 0
    for chunk in stream:
        received += sum(1 for c in chunk.choices if c.text)
        if received >= 3:
            break
    stream.close()
    wait_all_blocks_free(dep)
    # ...and the workers still serve.
    assert _ids(client, model, prompts[0], stream=False) == served[5][0]


def test_bench_reports_the_decode_workers_acceptance(served, tmp_path):
    import argparse

    from glmserve.bench import cli as bench

    dep, _, model, _, _, _ = served
    urls = worker_urls(dep, "decode")

    def totals():
        counters = [spec_counters(u) for u in urls]
        return [sum(c.get((f"glmserve:spec_decode_{n}_total", None), 0) for c in counters)
                for n in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")]

    before = totals()
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    result = tmp_path / "bench.json"
    args = parser.parse_args(["--base-url", dep.base_url, "--model", model, "--num-prompts", "4",
                              "--random-input-len", "8", "--random-output-len", "8", "--ignore-eos", "--disable-tqdm",
                              "--result-file", str(result), *[a for u in urls for a in ("--metrics-url", u + "/metrics")]])
    assert bench.run(args) == 0
    drafts, draft_tokens, accepted = (a - b for a, b in zip(totals(), before))
    spec = json.loads(result.read_text())["spec_decode"]
    assert (spec["num_drafts"], spec["num_draft_tokens"], spec["num_accepted_tokens"]) == (drafts, draft_tokens, accepted)
    assert drafts > 0 and spec["mean_acceptance_length"] == pytest.approx(1 + accepted / drafts)
    assert len(spec["per_position_acceptance_rate"]) == K
