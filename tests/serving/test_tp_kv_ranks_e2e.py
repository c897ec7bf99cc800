"""The KV link between TP groups goes rank to rank (engine/parallel/kv_plan.py, kv_ranks.py): through
`glmserve up` with GQA prefill TP 2 -> decode TP 2 (the two KV heads split across the ranks of both groups),
each decode rank receives exactly its own head's KV, from the prefill rank holding it, and the prefill
leader sends only its own head (no full-head mirror on either leader, no gather, no broadcast); a storm of
clients leaving at every stage, mid-transfer included, leaves every block free and the output exact."""

from __future__ import annotations

import asyncio
import random
import re

import httpx
import openai
import pytest

from glmserve.engine.loader import resolve_source
from glmserve.engine.tiny_model import build_tiny_model
from tests.engine_greedy import engine_greedy
from tests.serving.deployment import Deployment
from tests.serving.test_decode_admission_e2e import wait_all_blocks_free, worker_urls

# No prefix caching: every prompt token's KV crosses the link, so the bytes can be counted exactly.
ARGS = ("--dtype", "float32", "--num-kv-blocks", "64", "--block-size", "16", "--no-progress", "--tp", "2")
PROMPTS = [list(range(40, 61)), [7, 8, 9], list(range(100, 150))]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("glm4_moe", tmp_path_factory.mktemp("tp_kv_ranks") / "model", seed=7,
                            overrides={"max_position_embeddings": 2048})  # 2 KV heads


@pytest.fixture(scope="module")
def reference(model_dir):
    return engine_greedy(model_dir, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def dep(model_dir):
    with Deployment(model_dir, prefill=1, decode=1, extra_args=ARGS) as d:
        yield d


def _generate(dep: Deployment, prompt: list[int]) -> list[int]:
    client = openai.OpenAI(base_url=dep.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    resp = client.completions.create(model="model", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    return resp.choices[0].model_extra["token_ids"]


def _link_bytes(url: str, direction: str) -> dict[str, float]:
    """glmserve:kv_transfer_bytes_total by link label, for one direction."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r'glmserve:kv_transfer_bytes_total\{(.*)\} (\S+)$', line)
        if m and f'direction="{direction}"' in m.group(1):
            link = re.search(r'link="([^"]*)"', m.group(1)).group(1)
            out[link] = out.get(link, 0.0) + float(m.group(2))
    return out


def test_each_decode_rank_receives_its_own_heads_straight_from_the_prefill_rank_holding_them(dep, model_dir,
                                                                                             reference):
    cfg = resolve_source(str(model_dir), "auto")[0]
    per_token_per_head = cfg.num_hidden_layers * 2 * cfg.head_dim * 4  # K and V, fp32, every layer
    (decode,), (prefill,) = worker_urls(dep, "decode"), worker_urls(dep, "prefill")
    for prompt, want in zip(PROMPTS, reference):
        assert _generate(dep, prompt) == want, dep.log[-3000:]
    head_bytes = sum(len(p) for p in PROMPTS) * per_token_per_head  # one KV head of every prompt token
    recv = _link_bytes(decode, "recv")
    by_rank = {r: sum(v for k, v in recv.items() if k.endswith(f">d{r}")) for r in (0, 1)}
    # Rank 1's bytes reach the leader's metrics from its own link endpoint (the leader received none of them);
    # each rank got one head from exactly one prefill rank: from prefill rank r to decode rank r.
    assert by_rank == {0: head_bytes, 1: head_bytes}, recv
    assert {k.split("#")[1] for k in recv} == {"p0>d0", "p1>d1"}, recv
    assert sum(recv.values()) == 2 * head_bytes  # nothing else landed on the leader (no full-head mirror)
    # The prefill leader sent its own head only; its follower sent the other from its own cache.
    assert sum(_link_bytes(prefill, "send").values()) == head_bytes


def test_a_cancel_storm_mid_transfer_leaves_every_block_free_and_the_output_exact(dep, reference):
    rng = random.Random(77)

    async def one(client: httpx.AsyncClient, i: int):
        body = {"model": "model", "prompt": [rng.randrange(1, 200) for _ in range(rng.randint(100, 600))],
                "max_tokens": rng.randint(4, 40), "temperature": 0.7, "seed": i, "ignore_eos": True}
        try:
            await asyncio.wait_for(client.post("/v1/completions", json=body), rng.uniform(0.0, 1.0))
            return "completed"
        except asyncio.TimeoutError:  # the client leaves: queued, mid-prefill, mid-transfer or decoding
            return "left"

    async def run():
        async with httpx.AsyncClient(base_url=dep.base_url, timeout=120,
                                     limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(40)))

    outcomes = asyncio.run(run())
    assert outcomes.count("left") >= 10, outcomes
    wait_all_blocks_free(dep, timeout=60)
    # Blocks freed by the cancels are reused: nothing late from a cancelled transfer lands in them.
    for prompt, want in zip(PROMPTS, reference):
        assert _generate(dep, prompt) == want, dep.log[-3000:]
    wait_all_blocks_free(dep, timeout=60)
