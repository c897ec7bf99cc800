"""`glmserve serve --tp 2 --enable-expert-parallel`, driven by the official `openai` client: greedy tokens
equal the single-rank offline engine's; killing the non-leader rank ends the server within seconds with
a log line naming the rank (no hang)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest

from glmserve import LLM, SamplingParams
from glmserve.engine.tiny_model import build_tiny_model
from glmserve.local_ports import free_port
from tests.serving.serve_process import ServeProcess

PROMPTS = [list(range(40, 61)), [7, 8, 9]]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _rank_pids(pid: int) -> list[int]:
    """The spawned rank processes of the server (not multiprocessing's resource tracker)."""
    out = []
    for child in _children(pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            out.append(child)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("glm4_moe", tmp_path_factory.mktemp("serve_tp") / "model", seed=4)


def test_tp2_serves_the_single_rank_tokens_and_dies_with_its_rank(model_dir):
    reference = LLM(str(model_dir), dtype="float32", show_progress=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in reference.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy)]
    port = free_port()
    args = ["--model", str(model_dir), "--port", str(port), "--dtype", "float32", "--num-kv-blocks", "64",
            "--no-progress", "--tp", "2", "--enable-expert-parallel", "--torch-threads", "1"]
    with ServeProcess(args, port) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        for prompt, tokens in zip(PROMPTS, want):
            resp = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                             extra_body={"ignore_eos": True, "return_token_ids": True})
            assert resp.choices[0].model_extra["token_ids"] == tokens
        ranks = _rank_pids(server._proc.pid)
        assert len(ranks) == 1, ranks
        os.kill(ranks[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while server._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server._proc.poll() is not None, "the server kept running without its second rank"
        assert server._proc.returncode != 0
        time.sleep(0.3)  # the reader thread drains the last lines
        assert "tensor-parallel rank 1" in server.log and "exited" in server.log, server.log[-2000:]
