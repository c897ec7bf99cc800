"""Timeouts cancel requests on every worker; a draining decode worker finishes its streams and leaves the
pool. (A decode worker killed mid-stream: tests/serving/test_faults_e2e.py, where its streams migrate.)"""

from __future__ import annotations

import os
import signal
import time

import openai
import pytest

from glmserve.engine.tiny_model import build_tiny_model
from tests.serving.deployment import Deployment, pid_alive


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # A long context, so the streams are still running when the worker is killed, even on a busy machine.
    return build_tiny_model("glm4_moe", tmp_path_factory.mktemp("fail") / "model", seed=5,
                            overrides={"max_position_embeddings": 8192})


def busiest_decode_pid(dep) -> int:
    return _busiest_with_at_least(dep, 6)


def _busiest_with_at_least(dep, expected: int) -> int:
    """The decode worker running the most requests right now (the router's view of its load), once the
    reports show `expected` running requests in all."""
    import httpx

    deadline = time.monotonic() + 10
    while True:  # load reports are polled: wait until they show the streams
        loads = httpx.get(dep.base_url + "/load", timeout=10).json()
        running = {key.split(":", 1)[1]: (v["load"] or {}).get("running_requests", 0)
                   for key, v in loads.items() if key.startswith("decode:")}
        if sum(running.values()) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    by_grpc = {grpc: pid for name, (pid, _, grpc) in dep.processes.items() if name.startswith("decode")}
    return by_grpc[max(running, key=running.get)]


def test_timed_out_request_is_cancelled_on_every_worker(model_dir):
    import httpx

    with Deployment(model_dir, prefill=1, decode=1, extra_args=("--dtype", "float32", "--request-timeout", "2")) as dep:
        client = openai.OpenAI(base_url=dep.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        start = time.monotonic()
        with pytest.raises(openai.APIError, match="timed out"):
            for _ in client.completions.create(model="model", prompt=[5, 6, 7], max_tokens=6000, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}):
                pass
        assert time.monotonic() - start < 15
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="model", prompt=[5, 6, 7], max_tokens=6000, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert info.value.status_code == 408
        deadline = time.monotonic() + 15
        while True:
            loads = httpx.get(dep.base_url + "/load", timeout=10).json()
            if all(v["load"] and not v["load"].get("kv_usage") and not v["load"].get("running_requests")
                   for v in loads.values()):
                break
            assert time.monotonic() < deadline, f"blocks still held after the timeout: {loads}"
            time.sleep(0.3)
        # `kill` (SIGTERM) on the launcher stops everything it started, like Ctrl-C.
        pids = [pid for pid, _, _ in dep.processes.values()]
        dep._proc.send_signal(signal.SIGTERM)
        assert dep._proc.wait(20) == 0
    deadline = time.monotonic() + 20
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(p) for p in pids)


def test_draining_decode_worker_finishes_its_streams_and_leaves_the_pool(model_dir):
    with Deployment(model_dir, prefill=1, decode=2, extra_args=("--dtype", "float32")) as dep:
        client = openai.OpenAI(base_url=dep.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
        stream = client.completions.create(model="model", prompt=[3, 4, 5, 6], max_tokens=300, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        victim = _busiest_with_at_least(dep, 1)
        os.kill(victim, signal.SIGTERM)  # what Kubernetes sends before deleting a pod
        finish = None
        for chunk in chunks:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"  # the running request was finished, not dropped
        deadline = time.monotonic() + 30
        while pid_alive(victim) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(victim)
        for i in range(3):  # the router no longer sends anything to the drained worker
            r = client.completions.create(model="model", prompt=[9, i + 1], max_tokens=3, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.choices[0].finish_reason == "length"
