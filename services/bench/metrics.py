"""Benchmark figures from per-request timings, with the definitions `vllm bench serve` uses:
TTFT per successful request; TPOT = (latency - TTFT) / (output tokens - 1), so the first token's wait
is excluded and one-token replies are left out; ITL pooled over every gap of every request;
token totals over successful requests only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from glmserve.bench.client import RequestOutput
from glmserve.bench.datasets import SampleRequest, TextTokenizer


@dataclass(frozen=True)
class Stat:
    mean_ms: float
    median_ms: float
    p99_ms: float
    percentiles_ms: tuple[tuple[float, float], ...] = ()  # (percentile, ms) for --metric-percentiles


def stat_ms(values_s: Sequence[float], percentiles: Sequence[float] = (99.0,)) -> Stat:
    """Mean / median / P99 (and the asked percentiles) of durations in seconds, in milliseconds; zeros when
    there is nothing."""
    if len(values_s) == 0:
        return Stat(0.0, 0.0, 0.0, tuple((float(p), 0.0) for p in percentiles))
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    return Stat(float(arr.mean()), float(np.median(arr)), float(np.percentile(arr, 99)),
                tuple((float(p), float(np.percentile(arr, p))) for p in percentiles))


def peak_output_throughput(outputs: Sequence[RequestOutput]) -> float:
    """Most token-carrying chunks in any one-second bin since the first request started (vLLM's "Peak
    output token throughput"; one token per chunk, as its client counts)."""
    done = [o for o in outputs if o.success]
    if not done:
        return 0.0
    t0 = min(o.start_time for o in outputs)
    bins: dict[int, int] = {}
    for o in done:
        t = o.start_time + o.ttft
        for gap in [0.0, *o.itl]:
            t += gap
            bins[int(t - t0)] = bins.get(int(t - t0), 0) + 1
    return float(max(bins.values()))


def peak_concurrency(outputs: Sequence[RequestOutput]) -> int:
    """Most successful requests in flight at one moment (vLLM's "Peak concurrent requests")."""
    edges = sorted([(o.start_time, 1) for o in outputs if o.success]
                   + [(o.start_time + o.latency, -1) for o in outputs if o.success], key=lambda e: (e[0], e[1]))
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: Stat
    tpot: Stat
    itl: Stat
    e2el: Stat
    max_output_tokens_per_s: float = 0.0
    max_concurrent_requests: int = 0
    # Per request, in request order (0 for failed requests).
    input_lens: list[int] = field(default_factory=list)
    output_lens: list[int] = field(default_factory=list)


def token_counts(request: SampleRequest, output: RequestOutput,
                 tokenizer: TextTokenizer | None) -> tuple[int, int]:
    """(input, output) tokens. Input: the client's own count when a tokenizer measured the prompt, else
    the server's usage. Output: the server's usage, else a tokenizer count of the text, else the number
    of token-carrying chunks (one token each on a server without usage)."""
    input_len = request.prompt_len if request.prompt_len is not None else (output.usage_prompt_tokens or 0)
    if output.usage_completion_tokens is not None:
        output_len = output.usage_completion_tokens
    elif tokenizer is not None:
        output_len = len(tokenizer.encode(output.generated_text))
    else:
        output_len = output.token_chunks
    return input_len, output_len


def compute_metrics(requests: Sequence[SampleRequest], outputs: Sequence[RequestOutput], duration_s: float,
                    tokenizer: TextTokenizer | None = None, percentiles: Sequence[float] = (99.0,)
                    ) -> BenchmarkMetrics:
    input_lens, output_lens, ttfts, tpots, itls, e2els = [], [], [], [], [], []
    for req, out in zip(requests, outputs, strict=True):
        if not out.success:
            input_lens.append(0)
            output_lens.append(0)
            continue
        n_in, n_out = token_counts(req, out, tokenizer)
        input_lens.append(n_in)
        output_lens.append(n_out)
        ttfts.append(out.ttft)
        e2els.append(out.latency)
        itls.extend(out.itl)
        if n_out > 1:
            tpots.append((out.latency - out.ttft) / (n_out - 1))
    completed = sum(o.success for o in outputs)
    total_in, total_out = sum(input_lens), sum(output_lens)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return BenchmarkMetrics(
        completed=completed,
        failed=len(outputs) - completed,
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=completed * per_s,
        output_throughput=total_out * per_s,
        total_token_throughput=(total_in + total_out) * per_s,
        ttft=stat_ms(ttfts, percentiles),
        tpot=stat_ms(tpots, percentiles),
        itl=stat_ms(itls, percentiles),
        e2el=stat_ms(e2els, percentiles),
        max_output_tokens_per_s=peak_output_throughput(outputs),
        max_concurrent_requests=peak_concurrency(outputs),
        input_lens=input_lens,
        output_lens=output_lens,
    )
