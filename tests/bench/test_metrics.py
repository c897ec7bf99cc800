"""Metrics math on hand-made timings, and the printed layout."""

from __future__ import annotations

import pytest

from glmserve.bench.client import RequestOutput
from glmserve.bench.datasets import SampleRequest
from glmserve.bench.metrics import compute_metrics, stat_ms, token_counts
from glmserve.bench.report import format_report


def test_stat_ms_percentiles():
    s = stat_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s.mean_ms == pytest.approx(50.5)
    assert s.median_ms == pytest.approx(50.5)
    assert s.p99_ms == pytest.approx(99.01)  # linear interpolation at rank 0.99 * 99 = 98.01
    assert stat_ms([]).p99_ms == 0.0


def _ok(ttft, latency, itl, completion_tokens, prompt_tokens=None):
    return RequestOutput(success=True, ttft=ttft, latency=latency, itl=itl, usage_prompt_tokens=prompt_tokens,
                         usage_completion_tokens=completion_tokens, token_chunks=len(itl) + 1)


def test_compute_metrics_hand_made():
    reqs = [SampleRequest("a", 10, 11), SampleRequest("b", None, 1), SampleRequest("c", 99, 5)]
    outs = [
        _ok(ttft=0.1, latency=1.1, itl=[0.1] * 10, completion_tokens=11),  # TPOT (1.1-0.1)/10 = 100 ms
        _ok(ttft=0.2, latency=0.2, itl=[], completion_tokens=1, prompt_tokens=6),  # one token: no TPOT
        RequestOutput(success=False, error="HTTP 500: boom"),
    ]
    m = compute_metrics(reqs, outs, duration_s=2.0)
    assert (m.completed, m.failed) == (2, 1)
    assert m.total_input_tokens == 10 + 6  # tokenizer count for the first, server usage for the second
    assert m.total_output_tokens == 12
    assert m.input_lens == [10, 6, 0] and m.output_lens == [11, 1, 0]
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(6.0)
    assert m.total_token_throughput == pytest.approx(14.0)
    assert m.ttft.mean_ms == pytest.approx(150.0)
    assert m.tpot.mean_ms == pytest.approx(100.0) and m.tpot.p99_ms == pytest.approx(100.0)
    assert m.itl.mean_ms == pytest.approx(100.0)
    assert m.e2el.median_ms == pytest.approx(650.0)


def test_tpot_excludes_first_token_wait():
    # A 900 ms first token followed by 4 tokens 10 ms apart: TPOT is 10 ms, not (0.94 s / 5).
    out = _ok(ttft=0.9, latency=0.94, itl=[0.01] * 4, completion_tokens=5)
    m = compute_metrics([SampleRequest("p", 3, 5)], [out], duration_s=1.0)
    assert m.tpot.mean_ms == pytest.approx(10.0)
    assert m.ttft.mean_ms == pytest.approx(900.0)


class _WordTokenizer:
    def encode(self, text):
        return text.split()


def test_token_count_fallbacks():
    req = SampleRequest("p", None, 8)
    no_usage = RequestOutput(success=True, generated_text="x y z", token_chunks=5)
    assert token_counts(req, no_usage, _WordTokenizer()) == (0, 3)  # tokenizer count of the text
    assert token_counts(req, no_usage, None) == (0, 5)  # else one token per chunk
    with_usage = RequestOutput(success=True, generated_text="x", usage_prompt_tokens=4, usage_completion_tokens=9)
    assert token_counts(req, with_usage, _WordTokenizer()) == (4, 9)  # usage wins for output


# The labels of `vllm bench serve`'s report, in order, as printed in vLLM's GLM-4.5V guide
# (shared/seeds/004, the max-concurrency run).
VLLM_REPORT_LABELS = [
    "Successful requests", "Failed requests", "Maximum request concurrency", "Benchmark duration (s)",
    "Total input tokens", "Total generated tokens", "Request throughput (req/s)",
    "Output token throughput (tok/s)", "Peak output token throughput (tok/s)", "Peak concurrent requests",
    "Total Token throughput (tok/s)",
    "Mean TTFT (ms)", "Median TTFT (ms)", "P99 TTFT (ms)",
    "Mean TPOT (ms)", "Median TPOT (ms)", "P99 TPOT (ms)",
    "Mean ITL (ms)", "Median ITL (ms)", "P99 ITL (ms)"]


def test_report_layout():
    outs = [_ok(0.15, 1.15, [0.1] * 10, 11, prompt_tokens=3)]
    text = format_report(compute_metrics([SampleRequest("a", None, 11)], outs, 2.0), max_concurrency=4)
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    labels = [line.split(":")[0] for line in lines if ":" in line]
    assert labels == VLLM_REPORT_LABELS
    assert "-----Time per Output Token (excl. 1st token)------" in lines
    assert "---------------Time to First Token----------------" in lines
    assert "Mean TPOT (ms):                          100.00" in text  # values start at column 42
    assert "Output token throughput (tok/s):         5.50" in text
    # 11 tokens at t = 0.15, 0.25, ..., 1.15 s: 9 in the first second, 2 in the next.
    assert "Peak output token throughput (tok/s):    9.00" in text
    assert "Peak concurrent requests:                1.00" in text


def test_report_rate_line_and_chosen_percentiles():
    outs = [_ok(0.15, 1.15, [0.1] * 10, 11, prompt_tokens=3)]
    m = compute_metrics([SampleRequest("a", None, 11)], outs, 2.0, percentiles=(50, 99.9))
    text = format_report(m, request_rate=20.0, percentile_metrics=("ttft", "e2el"))
    labels = [line.split(":")[0] for line in text.splitlines() if ":" in line]
    assert "Request rate configured (RPS)" in labels
    assert labels[-8:] == ["Mean TTFT (ms)", "Median TTFT (ms)", "P50 TTFT (ms)", "P99.9 TTFT (ms)",
                           "Mean E2EL (ms)", "Median E2EL (ms)", "P50 E2EL (ms)", "P99.9 E2EL (ms)"]
    assert "---------------End-to-end Latency----------------" in text
    assert "P50 E2EL (ms):                           1150.00" in text


def test_peak_concurrency_counts_overlaps():
    from glmserve.bench.metrics import peak_concurrency

    def run(start, latency):
        return RequestOutput(success=True, start_time=start, latency=latency)

    # [0, 3), [1, 2), [1.5, 4), [5, 6): at most three in flight (between 1.5 and 2).
    assert peak_concurrency([run(0, 3), run(1, 1), run(1.5, 2.5), run(5, 1)]) == 3
    assert peak_concurrency([RequestOutput(success=False)]) == 0
