"""The guides' launch commands (shared/seeds/) started for real with `glmserve serve` on tiny models, then
queried with the guides' own curl bodies and bench command: they start, answer in the shapes those
servers use, and run with the settings they name.

Substitutions: model paths, ports; on a machine without CUDA the LightLLM line's fa3/flashinfer backends
become torch, and 16-way tensor parallelism becomes 1 with the MTP speculative config dropped (both are
refused with one line, see tests/cli/test_seed_commands.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

from glmserve.engine.tiny_model import build_tiny_model
from glmserve.local_ports import free_port
from tests.bench.test_metrics import VLLM_REPORT_LABELS
from tests.cli.seed_commands import LIGHTLLM, VLLM_ASCEND, VLLM_FP8, substitute, with_value, without
from tests.serving.serve_process import ServeProcess


@pytest.fixture(scope="module")
def flash_dir(tmp_path_factory):
    return build_tiny_model("glm4_moe_lite", tmp_path_factory.mktemp("flash") / "GLM-4.7-Flash", seed=3)


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    return build_tiny_model("glm4_moe", tmp_path_factory.mktemp("glm") / "glm4.5_w8a8_with_float_mtp", seed=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the literal line may start")
def test_lightllm_literal_line_without_cuda_is_one_line_error(flash_dir):
    words = substitute(LIGHTLLM, str(flash_dir) + "/", "127.0.0.1", free_port())
    proc = subprocess.run([sys.executable, "-m", "glmserve.cli", "serve", *words], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "glmserve serve: attention backend 'fa3' cannot run on device 'cpu': the fa3 attention backend needs a "
        "CUDA device, got 'cpu'"]


@pytest.fixture(scope="module")
def lightllm(flash_dir):
    port = free_port()
    words = substitute(LIGHTLLM, str(flash_dir) + "/", "0.0.0.0", port)
    if not torch.cuda.is_available():
        words = with_value(with_value(words, "--llm_prefill_att_backend", "torch"), "--llm_decode_att_backend", "torch")
    with ServeProcess(words, port) as s:
        yield s


def test_lightllm_generate_curl(lightllm):
    body = {"inputs": "What is AI?", "parameters": {"max_new_tokens": 100, "frequency_penalty": 1}}
    r = httpx.post(lightllm.base_url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    # LightLLM's shapes for one sequence: generated_text a list, count and finish_reason scalars.
    assert isinstance(out["generated_text"], list) and len(out["generated_text"]) == 1
    assert isinstance(out["count_output_tokens"], int) and 1 <= out["count_output_tokens"] <= 100
    assert out["finish_reason"] in ("stop", "length") and isinstance(out["prompt_tokens"], int)
    two = httpx.post(lightllm.base_url + "/generate", timeout=120,
                     json={"inputs": "What is AI?", "parameters": {"max_new_tokens": 4, "n": 2, "ignore_eos": True,
                                                                  "do_sample": True, "return_details": True}}).json()
    assert two["count_output_tokens"] == [4, 4] and two["finish_reason"] == ["length", "length"]
    assert [len(t) for t in two["tokens"]] == [4, 4]


def test_lightllm_generate_stream_and_model_name(lightllm):
    body = {"inputs": "What is AI?", "parameters": {"max_new_tokens": 6, "ignore_eos": True}}
    with httpx.stream("POST", lightllm.base_url + "/generate_stream", json=body, timeout=120) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert [set(e) for e in events] == [{"token", "generated_text", "finished", "finish_reason", "details"}] * 6
    assert [e["finished"] for e in events] == [False] * 5 + [True] and events[-1]["finish_reason"] == "length"
    assert [e["token"]["count_output_tokens"] for e in events] == [1, 2, 3, 4, 5, 6]
    for path in ("/get_model_name",):
        assert httpx.get(lightllm.base_url + path).json() == {"model_name": "GLM-4.7-Flash"}


def test_lightllm_chat_curl_uses_the_named_parsers(lightllm):
    body = {"model": "GLM-4.7-Flash", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 100}
    r = httpx.post(lightllm.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert "reasoning_content" in message  # --reasoning_parser glm45 is in effect


def test_tokenize_detokenize_round_trip_matches_transformers(lightllm, flash_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(flash_dir)
    text = "What is AI? 人工智能"
    tok = httpx.post(lightllm.base_url + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert tok["tokens"] == hf(text)["input_ids"] and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == 512 and tok["token_strs"] == hf.convert_ids_to_tokens(tok["tokens"])
    back = httpx.post(lightllm.base_url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back == {"prompt": hf.decode(tok["tokens"])}
    messages = [{"role": "user", "content": "Hello"}]
    chat = httpx.post(lightllm.base_url + "/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    bad = httpx.post(lightllm.base_url + "/detokenize", json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and "out of range" in bad.json()["error"]["message"]


@pytest.fixture(scope="module")
def vllm_ascend(glm_dir):
    port = free_port()
    words = substitute(VLLM_ASCEND, str(glm_dir)) + ["--port", str(port)]
    words = with_value(without(words, "--speculative-config"), "--tensor-parallel-size", "1")
    with ServeProcess(words, port) as s:
        yield s


def test_vllm_ascend_bench_command(vllm_ascend, glm_dir):
    """The guide's `vllm bench serve` line, prefix/suffix/output lengths scaled 100x down to a 512-token model."""
    cmd = [sys.executable, "-m", "glmserve.cli", "bench", "--backend", "vllm", "--dataset-name", "prefix_repetition",
           "--prefix-repetition-prefix-len", "224", "--prefix-repetition-suffix-len", "96",
           "--prefix-repetition-output-len", "10", "--num-prompts", "1", "--prefix-repetition-num-prefixes", "1",
           "--ignore-eos", "--model", "glm", "--tokenizer", str(glm_dir), "--seed", "1000", "--host", "0.0.0.0",
           "--port", str(vllm_ascend.port), "--endpoint", "/v1/completions", "--max-concurrency", "1",
           "--request-rate", "1", "--disable-tqdm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    labels = [line.split(":")[0] for line in proc.stdout.splitlines() if ":" in line and "(" in line or
              line.startswith(("Successful", "Failed", "Total input", "Total generated", "Peak concurrent",
                               "Maximum request"))]
    for label in VLLM_REPORT_LABELS + ["Request rate configured (RPS)"]:
        assert label in labels, proc.stdout
    assert "Successful requests:                     1" in proc.stdout
    assert "Total generated tokens:                  10" in proc.stdout
    assert "Total input tokens:                      321" in proc.stdout  # 224 + space + 96, counted locally


def test_vllm_ascend_settings_in_effect(vllm_ascend):
    models = httpx.get(vllm_ascend.base_url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["glm"]  # --served-model-name glm
    r = httpx.post(vllm_ascend.base_url + "/v1/completions", timeout=60,
                   json={"model": "glm", "prompt": "hi", "max_tokens": 600, "ignore_eos": True})
    # --max-model-len 35000 is capped by the tiny model's 512 positions, as vLLM would refuse above it.
    assert r.status_code == 400 and "maximum context length is 512" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def vllm_fp8(glm_dir):
    port = free_port()
    words = with_value(substitute(VLLM_FP8, str(glm_dir)), "--tensor-parallel-size", "1")
    with ServeProcess(words + ["--port", str(port), "--enforce-eager"], port) as s:
        yield s


def test_vllm_fp8_curls(vllm_fp8):
    assert httpx.get(vllm_fp8.base_url + "/v1/models").status_code == 200  # curl -sf .../v1/models
    body = {"model": "glm47-fp8", "messages": [{"role": "user", "content": "你好,请介绍一下自己"}],
            "temperature": 0, "max_tokens": 200}
    r = httpx.post(vllm_fp8.base_url + "/v1/chat/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 200
    notes = vllm_fp8.log
    assert "note: --enable-expert-parallel" not in notes  # a real flag now (experts over the TP ranks: here, one)
