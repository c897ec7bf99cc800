"""`glmserve bench` driven with `vllm bench serve`'s option names against the fake OpenAI server:
backends, dataset names, --host/--port, prefix-repetition options, percentile rows, --save-result, and
a server that ends its stream without `data: [DONE]`."""

from __future__ import annotations

import json
from urllib.parse import urlparse

import pytest

from glmserve.bench import cli
from glmserve.cli import build_parser
from tests.bench.test_end_to_end import _send_one


def _bench(*argv: str):
    return build_parser().parse_args(["bench", *argv])


def _host_port(server) -> tuple[str, str]:
    url = urlparse(server.base_url)
    return url.hostname, str(url.port)


def test_stream_without_done_counts_when_it_finished(fake_server):
    out = _send_one(fake_server.base_url, "no-done", "/v1/chat/completions")
    assert out.success, out.error
    assert out.generated_text == "w0 w1 w2 w3 w4 " and out.usage_completion_tokens == 5


def test_vllm_ascend_prefix_repetition_command(fake_server, tiny_tokenizer, tmp_path, capsys):
    """The guide's command (vllm-ascend GLM-4.x), lengths scaled down 100x; --tokenizer is the tiny model."""
    host, port = _host_port(fake_server)
    args = _bench("--backend", "vllm", "--dataset-name", "prefix_repetition",
                  "--prefix-repetition-prefix-len", "224", "--prefix-repetition-suffix-len", "96",
                  "--prefix-repetition-output-len", "10", "--num-prompts", "2", "--prefix-repetition-num-prefixes",
                  "1", "--ignore-eos", "--model", "glm", "--tokenizer", str(tiny_tokenizer.model_dir),
                  "--seed", "1000", "--host", host, "--port", port, "--endpoint", "/v1/completions",
                  "--max-concurrency", "1", "--request-rate", "1", "--disable-tqdm",
                  "--save-result", "--result-dir", str(tmp_path))
    assert cli.run(args) == 0
    printed = capsys.readouterr().out
    for label in ("Peak output token throughput (tok/s):", "Peak concurrent requests:                1.00",
                  "Request rate configured (RPS):           1.00", "Maximum request concurrency:             1"):
        assert label in printed
    sent = fake_server.state.payloads
    assert len(sent) == 2 and all(p["max_tokens"] == 10 and p["ignore_eos"] for p in sent)
    prompts = [p["prompt"] for p in sent]
    prefix_ids = [tiny_tokenizer.encode(p)[:224] for p in prompts]
    assert prefix_ids[0] == prefix_ids[1]  # one shared prefix of 224 tokens
    saved = list(tmp_path.glob("vllm-1.0qps-concurrency1-glm-*.json"))
    assert len(saved) == 1
    result = json.loads(saved[0].read_text())
    assert result["total_input_tokens"] == 2 * (224 + 96 + 1)  # prefix, a space, suffix: counted locally
    assert result["max_concurrent_requests"] == 1 and result["completed"] == 2


def test_openai_chat_backend_percentiles_and_no_done(fake_server, capsys):
    host, port = _host_port(fake_server)
    args = _bench("--backend", "openai-chat", "--model", "no-done", "--dataset-name", "random",
                  "--random-input-len", "8", "--random-output-len", "4", "--num-prompts", "3", "--host", host,
                  "--port", port, "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
                  "--disable-tqdm")
    assert cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "Successful requests:                     3" in printed
    for short in ("TTFT", "TPOT", "ITL", "E2EL"):
        for p in ("50", "90", "99"):
            assert f"P{p} {short} (ms):" in printed
    assert all("messages" in p for p in fake_server.state.payloads)  # openai-chat -> /v1/chat/completions


@pytest.mark.parametrize("argv, message", [
    (("--dataset-name", "hf", "--dataset-path", "lmarena-ai/VisionArena-Chat"), "--dataset-name hf is not supported"),
    (("--backend", "tgi"), "--backend tgi is not supported"),
    (("--backend", "openai-chat", "--endpoint", "/v1/completions"), "sends to /v1/chat/completions"),
    (("--percentile-metrics", "ttft,latency"), "--percentile-metrics: latency"),
    (("--metric-percentiles", "0"), "--metric-percentiles"),
])
def test_refused_options_name_what_to_use(argv, message, capsys):
    assert cli.run(_bench("--model", "m", "--port", "9", *argv)) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
