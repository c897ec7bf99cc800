"""A decode worker killed mid-stream: its clients get an error within seconds (no hang), new requests go
to the surviving decode worker, and `glmserve up` stops every process it started on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import openai
import pytest

from glmserve.engine.tiny_model import build_tiny_model
from tests.serving.deployment import Deployment


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # A long context, so the streams are still running when the worker is killed, even on a busy machine.
    return build_tiny_model("glm4_moe", tmp_path_factory.mktemp("fail") / "model", seed=5,
                            overrides={"max_position_embeddings": 8192})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_decode_worker_fails_its_streams_fast_and_traffic_moves_on(model_dir):
    with Deployment(model_dir, prefill=1, decode=2, extra_args=("--dtype", "float32")) as dep:
        aclient = openai.AsyncOpenAI(base_url=dep.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        victim_pid = dep.processes["decode-0"][0]
        model = "model"

        async def one_stream(i: int, started: asyncio.Event, kill_time: list[float]):
            stream = await aclient.completions.create(model=model, prompt=list(range(10, 30 + i)), max_tokens=6000,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
            try:
                async for _ in stream:
                    started.set()
                return "completed", None
            except openai.APIError as exc:
                return "error", time.monotonic() - kill_time[0]

        async def run():
            events = [asyncio.Event() for _ in range(6)]
            kill_time = [0.0]
            tasks = [asyncio.create_task(one_stream(i, events[i], kill_time)) for i in range(6)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            kill_time[0] = time.monotonic()
            os.kill(victim_pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 90)

        outcomes = asyncio.run(run())
        errors = [t for kind, t in outcomes if kind == "error"]
        assert errors, f"no stream ran on the killed worker: {outcomes}"
        assert max(errors) < 10, f"clients waited too long after the worker died: {errors}"
        # New requests succeed on the surviving decode worker.
        client = openai.OpenAI(base_url=dep.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        for i in range(4):
            r = client.completions.create(model=model, prompt=[1, 2, 3, i + 4], max_tokens=4, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.choices[0].finish_reason == "length"
        pids = [pid for pid, _, _ in dep.processes.values()]
    # Ctrl-C on `glmserve up` stops everything it started.
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
