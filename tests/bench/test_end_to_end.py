"""`glmserve bench` through its CLI entry points against a fake OpenAI streaming server."""

from __future__ import annotations

import argparse
import json

import aiohttp
import asyncio
import pytest

from glmserve.bench import cli
from glmserve.bench.client import build_payload, send_request
from glmserve.bench.datasets import SampleRequest


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def _send_one(base_url: str, model: str, endpoint: str, output_len: int = 5):
    async def go():
        payload = build_payload(endpoint, model, SampleRequest("a b c", None, output_len), 0.0, ignore_eos=True)
        async with aiohttp.ClientSession() as session:
            return await send_request(session, base_url + endpoint, payload)

    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_single_request_timings(fake_server, endpoint):
    out = _send_one(fake_server.base_url, "ok", endpoint)
    assert out.success, out.error
    assert out.generated_text == "w0 w1 w2 w3 w4 "
    assert len(out.itl) == 4  # chat's role-only chunk is not a token
    assert 0 < out.ttft < out.latency
    assert (out.usage_prompt_tokens, out.usage_completion_tokens) == (3, 5)
    sent = fake_server.state.payloads[0]
    assert sent["stream_options"] == {"include_usage": True} and sent["ignore_eos"] is True
    assert sent["max_tokens"] == 5


@pytest.mark.parametrize("model, error", [("truncate", "[DONE]"), ("midstream-error", "decode worker lost")])
def test_broken_streams_are_failures(fake_server, model, error):
    out = _send_one(fake_server.base_url, model, "/v1/completions")
    assert not out.success
    assert error in out.error


def test_unreachable_server_is_a_failure():
    out = _send_one("http://127.0.0.1:9", "ok", "/v1/completions")  # discard port: nothing listens
    assert not out.success and out.error


def test_cli_run_counts_failures_and_writes_json(fake_server, tmp_path, capsys):
    result_file = tmp_path / "out.json"
    args = _args("--base-url", fake_server.base_url, "--model", "flaky", "--endpoint", "/v1/chat/completions",
                 "--dataset", "random", "--num-prompts", "8", "--random-input-len", "12",
                 "--random-output-len", "6", "--max-concurrency", "2", "--ignore-eos", "--seed", "1",
                 "--result-file", str(result_file), "--label", "fake", "--disable-tqdm")
    assert cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in printed
    assert "Successful requests:                     6" in printed
    assert "Failed requests:                         2" in printed
    assert "Total generated tokens:                  36" in printed
    assert fake_server.state.peak_in_flight <= 2  # the cap holds at the server too

    data = json.loads(result_file.read_text())
    assert (data["completed"], data["failed"], data["num_prompts"]) == (6, 2, 8)
    assert data["total_output_tokens"] == 36
    assert data["total_input_tokens"] == 6 * 12  # server usage: one word per token in the fake
    assert data["label"] == "fake" and data["hostname"] and data["date"]
    assert data["arguments"]["max_concurrency"] == 2 and data["arguments"]["request_rate"] == "inf"
    assert sum("HTTP 500" in e for e in data["errors"]) == 2
    assert data["successes"].count(True) == 6
    for ok, itl, ttft in zip(data["successes"], data["itls"], data["ttfts"]):
        assert len(itl) == (5 if ok else 0) and (ttft is not None) == ok
    for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms", "mean_e2el_ms",
                "request_throughput", "output_throughput", "total_token_throughput", "duration"):
        assert data[key] > 0, key
    assert "git_commit" in data


def test_cli_poisson_prefix_repetition_with_tokenizer(fake_server, tmp_path):
    from glmserve.engine.tiny_tokenizer import TINY_ASSETS_DIR
    from glmserve.engine.tokenizer import Tokenizer

    result_file = tmp_path / "out.json"
    args = _args("--base-url", fake_server.base_url, "--model", "ok", "--dataset", "prefix-repetition",
                 "--num-prompts", "6", "--prefix-len", "16", "--num-prefixes", "2", "--random-input-len", "4",
                 "--random-output-len", "3", "--request-rate", "100", "--tokenizer", str(TINY_ASSETS_DIR),
                 "--result-file", str(result_file), "--disable-tqdm")
    assert cli.run(args) == 0
    data = json.loads(result_file.read_text())
    assert data["completed"] == 6 and data["total_output_tokens"] == 18
    payloads = fake_server.state.payloads
    assert all(p["max_tokens"] == 3 for p in payloads)
    tok = Tokenizer(TINY_ASSETS_DIR)
    # Input tokens are the client's tokenizer counts, not the fake server's word-count usage.
    assert sorted(data["input_lens"]) == sorted(len(tok.encode(p["prompt"])) for p in payloads)
    assert sorted(data["input_lens"]) != sorted(len(p["prompt"].split()) for p in payloads)


def test_cli_unreachable_server_fails_fast(capsys):
    args = _args("--base-url", "http://127.0.0.1:9", "--model", "m", "--num-prompts", "2",
                 "--random-input-len", "4", "--disable-tqdm")
    assert cli.run(args) == 1
    out = capsys.readouterr()
    assert "cannot reach the server at http://127.0.0.1:9/v1/models" in out.err and "Sending" not in out.out


def test_cli_sharegpt_needs_path(capsys):
    assert cli.run(_args("--model", "m", "--dataset", "sharegpt")) == 1
    assert "--dataset-path" in capsys.readouterr().err
