"""Prefill and decode workers whose tensor-parallel groups span two "nodes" on one machine, started as the
pods of a LeaderWorkerSet would be: `glmserve prefill|decode --tp 2 --nnodes 2 --node-rank 0|1
--dist-init-addr H:P` per node and a router that knows only the leaders. The tiny GQA model's two KV heads
split across the ranks, so the prefill leader gathers its follower's head over the group for the link and
the decode leader hands the other head to its follower on the other node. Greedy tokens through the
official `openai` client equal the single-process engine's; node 1 of a group leaves cleanly when its
leader stops; a node 1 that dies while the group is idle ends its leader within seconds with a clear line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from glmserve.engine.tiny_model import build_tiny_model
from tests.engine_greedy import engine_greedy
from glmserve.local_ports import free_ports
from tests.serving.serve_process import ServeProcess

PROMPTS = [list(range(40, 61)), list(range(40, 56)) + [3, 4, 5]]  # the second reuses decode's first block
MAX_TOKENS = 8
ENGINE = ("--dtype", "float32", "--num-kv-blocks", "64", "--block-size", "16", "--no-progress",
          "--enable-prefix-caching", "--torch-threads", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("glm4_moe", tmp_path_factory.mktemp("pd_two_nodes") / "model", seed=8)


@pytest.fixture(scope="module")
def reference(model_dir):
    return engine_greedy(model_dir, PROMPTS, MAX_TOKENS)


def _group_args(model_dir, node_rank: int, store_port: int) -> list[str]:
    return ["--model", str(model_dir), *ENGINE, "--tp", "2", "--nnodes", "2", "--node-rank", str(node_rank),
            "--dist-init-addr", f"127.0.0.1:{store_port}"]


def _start_node1(role: str, model_dir, store_port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "glmserve.cli", role, *_group_args(model_dir, 1, store_port)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def _generate(base_url: str, prompt: list[int]) -> list[int]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=180)
    resp = client.completions.create(model="model", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    return resp.choices[0].model_extra["token_ids"]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_prefill_and_decode_groups_across_two_nodes(model_dir, reference):
    p_store, d_store, p_grpc, p_http, d_grpc, d_http, port = free_ports(7)
    p_node1 = _start_node1("prefill", model_dir, p_store)
    d_node1 = _start_node1("decode", model_dir, d_store)
    leader = {"prefill": (p_store, p_grpc, p_http, ()), "decode": (d_store, d_grpc, d_http, ("--kv-port", "0"))}
    workers = {role: ServeProcess([*_group_args(model_dir, 0, store), "--host", "127.0.0.1", "--grpc-port", str(g),
                                   "--http-port", str(h), "--served-model-name", "model", *extra], h, command=role)
               for role, (store, g, h, extra) in leader.items()}
    router = ServeProcess(["--model", str(model_dir), "--served-model-name", "model", "--host", "127.0.0.1",
                           "--port", str(port), "--prefill", f"127.0.0.1:{p_grpc}", "--decode", f"127.0.0.1:{d_grpc}",
                           "--health-interval", "0.5", "--worker-wait-timeout", "180"], port, command="router")
    try:
        with workers["prefill"] as prefill, workers["decode"] as decode, router:
            for prompt, want in zip(PROMPTS, reference):
                assert _generate(router.base_url, prompt) == want, prefill.log[-2000:] + decode.log[-2000:]

            # Node 1 of the decode group dies while the group is idle: the leader's next idle message fails,
            # and it exits with a clear line within seconds, without a request to notice it.
            _kill(d_node1)
            deadline = time.monotonic() + 20
            while decode._proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert decode._proc.poll() not in (None, 0), "the decode leader kept running without node 1"
            # Whichever idle message goes first finds it: the leader's keep-alive or the decode ranks' KV
            # control round (engine/parallel/kv_ranks.py).
            assert ("the tensor-parallel group broke while idle" in decode.log
                    or "the tensor-parallel group broke during a KV control round" in decode.log), decode.log[-3000:]
            assert prefill._proc.poll() is None  # the other group is unaffected
        # The prefill leader stopped (SIGINT on leaving its block): its node 1 follows it out cleanly.
        assert p_node1.wait(30) == 0, p_node1.stdout.read()[-3000:]
        assert "node 1 of 2: ranks 1..1 follow the leader" in p_node1.stdout.read()
    finally:
        _kill(p_node1)
        _kill(d_node1)
