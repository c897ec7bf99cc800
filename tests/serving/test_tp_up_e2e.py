"""`glmserve up` with tensor-parallel prefill and decode workers (CPU, fp32, gloo), driven by the official
`openai` client: greedy tokens equal the single-process engine's for prefill TP 2 -> decode TP 2 and
prefill TP 2 -> decode TP 1 with MLA (the latent is whole on every rank: prefill rank 0 sends it to every
decode rank), and for GQA with the KV heads split across ranks (TP 2 -> 2, 2 -> 1, 1 -> 2: each prefill rank
sends its heads straight to the decode ranks holding them; test_tp_kv_ranks_e2e.py counts the bytes); repeated
prompts reuse decode's prefix cache; killing a decode worker's non-leader rank ends that worker, the others keep serving and
the supervisor restarts it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest

from glmserve.engine.tiny_model import build_tiny_model
from tests.engine_greedy import engine_greedy
from tests.serving.deployment import Deployment, pid_alive

# The second prompt shares the first's first 16 tokens (whole blocks): decode reuses them the second time.
PROMPTS = [list(range(40, 61)), [7, 8, 9], list(range(40, 56)) + [3, 4, 5, 6]]
MAX_TOKENS = 8
ARGS = ("--dtype", "float32", "--num-kv-blocks", "64", "--block-size", "16", "--no-progress",
        "--enable-prefix-caching")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("glm4_moe_lite", tmp_path_factory.mktemp("tp_up") / "model", seed=6)


@pytest.fixture(scope="module")
def reference(model_dir):
    return engine_greedy(model_dir, PROMPTS, MAX_TOKENS)


def _generate(dep: Deployment, prompt: list[int]) -> list[int]:
    client = openai.OpenAI(base_url=dep.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    resp = client.completions.create(model="model", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    return resp.choices[0].model_extra["token_ids"]


def _rank_pids(pid: int) -> list[int]:
    """A worker's spawned rank processes (not multiprocessing's resource tracker). Every thread's children:
    the worker starts its ranks from a loader thread."""
    kids = [int(k) for t in Path(f"/proc/{pid}/task").glob("*/children") for k in t.read_text().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def test_prefill_tp2_to_decode_tp1(model_dir, reference):
    with Deployment(model_dir, prefill=1, decode=1,
                    extra_args=(*ARGS, "--prefill-tensor-parallel-size", "2")) as dep:
        assert len(_rank_pids(dep.processes["prefill-0"][0])) == 1
        assert _rank_pids(dep.processes["decode-0"][0]) == []
        for prompt, want in zip(PROMPTS, reference):
            assert _generate(dep, prompt) == want, dep.log[-3000:]


def test_prefill_tp2_to_decode_tp2_and_a_dead_rank_ends_only_its_worker(model_dir, reference):
    with Deployment(model_dir, prefill=1, decode=2, extra_args=(*ARGS, "--tp", "2")) as dep:
        for prompt, want in zip(PROMPTS + PROMPTS, reference + reference):  # both decode workers, prefix hits
            assert _generate(dep, prompt) == want, dep.log[-3000:]
        victim = dep.processes["decode-0"][0]
        ranks = _rank_pids(victim)
        assert len(ranks) == 1, ranks
        os.kill(ranks[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while pid_alive(victim) and dep.processes["decode-0"][0] == victim and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dep.processes["decode-0"][0] != victim or not pid_alive(victim), "decode-0 kept running without rank 1"
        assert "tensor-parallel rank 1" in dep.log and "exiting" in dep.log, dep.log[-3000:]
        for prompt, want in zip(PROMPTS, reference):  # served by decode-1 meanwhile (and decode-0 once back)
            assert _generate(dep, prompt) == want, dep.log[-3000:]
        deadline = time.monotonic() + 120
        while " restarted (pid " not in dep.log and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "decode-0 restarted (pid " in dep.log, dep.log[-3000:]


@pytest.fixture(scope="module")
def gqa_model_dir(tmp_path_factory):
    return build_tiny_model("glm4_moe", tmp_path_factory.mktemp("tp_up_gqa") / "model", seed=7)  # 2 KV heads


@pytest.fixture(scope="module")
def gqa_reference(gqa_model_dir):
    return engine_greedy(gqa_model_dir, PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 2), (2, 1), (1, 2)])
def test_gqa_with_split_kv_heads(gqa_model_dir, gqa_reference, prefill_tp, decode_tp):
    with Deployment(gqa_model_dir, prefill=1, decode=1,
                    extra_args=(*ARGS, "--prefill-tensor-parallel-size", str(prefill_tp),
                                "--decode-tensor-parallel-size", str(decode_tp))) as dep:
        assert len(_rank_pids(dep.processes["decode-0"][0])) == decode_tp - 1
        for prompt, want in zip(PROMPTS + PROMPTS, gqa_reference + gqa_reference):
            assert _generate(dep, prompt) == want, dep.log[-3000:]
