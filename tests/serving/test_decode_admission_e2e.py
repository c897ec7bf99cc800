"""Decode admission through `glmserve up`: --max-num-seqs bounds the decode batch (requests waiting for
their KV hold a slot too), and a storm of clients that leave at every stage (queued for blocks, during the
transfer, after the first token, mid-decode; streaming or not; n = 1 or 2) leaves no KV block held."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import pytest

from glmserve.engine.tiny_model import build_tiny_model
from tests.serving.deployment import Deployment

MAX_SEQS = 4


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    model = build_tiny_model("glm4_moe", tmp_path_factory.mktemp("admission") / "model", seed=11,
                             overrides={"max_position_embeddings": 2048})
    # A small cache (48 blocks of 16 tokens per worker), so requests queue for blocks.
    args = ("--dtype", "float32", "--max-num-seqs", str(MAX_SEQS), "--num-kv-blocks", "48")
    with Deployment(model, prefill=1, decode=2, extra_args=args) as d:
        d.model_name = httpx.get(d.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        yield d


def worker_urls(dep, role: str) -> list[str]:
    return [ready.rsplit("/", 1)[0] for name, (_, ready, _) in dep.processes.items() if name.startswith(role)]


def wait_all_blocks_free(dep, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = {u: httpx.get(u + "/load", timeout=10).json() for u in worker_urls(dep, "decode") + worker_urls(dep, "prefill")}
        if all(s["kv_cache_usage_perc"] == 0 and s["num_requests_running"] == 0 and s["num_requests_waiting"] == 0
               for s in stats.values()):
            return stats
        assert time.monotonic() < deadline, f"KV blocks still held: {stats}"
        time.sleep(0.25)


def test_max_num_seqs_bounds_the_decode_batch(dep):
    samples: list[int] = []
    stop = threading.Event()

    def sample():
        urls = worker_urls(dep, "decode")
        with httpx.Client(timeout=5) as c:
            while not stop.is_set():
                for u in urls:
                    s = c.get(u + "/load").json()
                    samples.append(s["num_requests_running"] + s["num_requests_waiting_for_remote_kv"])
                time.sleep(0.02)

    async def run():
        async with httpx.AsyncClient(base_url=dep.base_url, timeout=120) as client:
            async def one(i):
                r = await client.post("/v1/completions", json={
                    "model": dep.model_name, "prompt": list(range(5, 25 + i % 7)), "max_tokens": 24, "temperature": 0,
                    "ignore_eos": True})
                return r.status_code, (r.json().get("choices") or [r.json()])[0].get("finish_reason", r.text)
            return await asyncio.gather(*(one(i) for i in range(32)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        results = asyncio.run(run())
    finally:
        stop.set()
        sampler.join(10)
    assert results == [(200, "length")] * 32
    assert samples and max(samples) <= MAX_SEQS, max(samples)
    assert max(samples) == MAX_SEQS  # the bound was reached, so it was the bound that held
    wait_all_blocks_free(dep)


def test_cancel_storm_at_every_stage_frees_every_block(dep):
    """Half the clients leave after a random time (queued, waiting for blocks, mid-transfer, or later),
    half leave a stream after a random number of token chunks (after the first token, mid-decode)."""
    rng = random.Random(1234)
    outcomes: dict[str, int] = {"left_on_time": 0, "left_after_tokens": 0, "completed": 0}

    async def one(client: httpx.AsyncClient, i: int):
        by_tokens = i % 2 == 1
        stream = by_tokens or rng.random() < 0.5
        body = {"model": dep.model_name, "prompt": [rng.randrange(1, 200) for _ in range(rng.randint(20, 300))],
                "max_tokens": rng.randint(40, 200), "temperature": 0.7, "seed": i, "n": rng.choice([1, 1, 2]),
                "ignore_eos": True, "stream": stream}
        leave_after_s = rng.uniform(0.0, 1.5) if not by_tokens else 120.0
        leave_after_chunks = rng.randint(1, 20)

        async def talk():
            if not stream:
                await client.post("/v1/completions", json=body)
                return "completed"
            chunks = 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("text") is not None:
                        chunks += 1
                        if by_tokens and chunks >= leave_after_chunks:
                            return "left_after_tokens"  # closing the response drops the connection
            return "completed"

        try:
            outcomes[await asyncio.wait_for(talk(), leave_after_s)] += 1
        except asyncio.TimeoutError:  # the client goes away: connection closed
            outcomes["left_on_time"] += 1

    async def run():
        async with httpx.AsyncClient(base_url=dep.base_url, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as client:
            await asyncio.gather(*(one(client, i) for i in range(100)))

    asyncio.run(run())
    assert outcomes["left_on_time"] >= 25 and outcomes["left_after_tokens"] >= 25, outcomes
    wait_all_blocks_free(dep)
    # And the deployment still serves.
    r = httpx.post(dep.base_url + "/v1/completions", timeout=60,
                   json={"model": dep.model_name, "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0,
                         "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
