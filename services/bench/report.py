"""The printed summary (laid out like `vllm bench serve`, so results read side by side) and the JSON
result file."""

from __future__ import annotations

import json
import math
import socket
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from glmserve.bench.client import RequestOutput
from glmserve.bench.metrics import BenchmarkMetrics, Stat

WIDTH = 50
_SECTIONS = {  # --percentile-metrics name -> (title, short name)
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}
DEFAULT_PERCENTILE_METRICS = ("ttft", "tpot", "itl")


def percentile_label(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def _banner(text: str, fill: str) -> str:
    return f"{text:{fill}^{WIDTH}}"


def _row(label: str, value: Any) -> str:
    shown = f"{value:<10.2f}" if isinstance(value, float) else f"{value:<10}"
    return f"{label + ':':<40} {shown}".rstrip()


def format_report(m: BenchmarkMetrics, max_concurrency: int | None = None,
                  request_rate: float = math.inf,
                  percentile_metrics: Sequence[str] = DEFAULT_PERCENTILE_METRICS) -> str:
    lines = [_banner(" Serving Benchmark Result ", "="),
             _row("Successful requests", m.completed),
             _row("Failed requests", m.failed)]
    if max_concurrency is not None:
        lines.append(_row("Maximum request concurrency", max_concurrency))
    if not math.isinf(request_rate):
        lines.append(_row("Request rate configured (RPS)", float(request_rate)))
    lines += [_row("Benchmark duration (s)", m.duration_s),
              _row("Total input tokens", m.total_input_tokens),
              _row("Total generated tokens", m.total_output_tokens),
              _row("Request throughput (req/s)", m.request_throughput),
              _row("Output token throughput (tok/s)", m.output_throughput),
              _row("Peak output token throughput (tok/s)", m.max_output_tokens_per_s),
              _row("Peak concurrent requests", float(m.max_concurrent_requests)),
              _row("Total Token throughput (tok/s)", m.total_token_throughput)]
    for attr in percentile_metrics:
        title, short = _SECTIONS[attr]
        stat: Stat = getattr(m, attr)
        lines += [_banner(title, "-"),
                  _row(f"Mean {short} (ms)", stat.mean_ms),
                  _row(f"Median {short} (ms)", stat.median_ms)]
        pcts = stat.percentiles_ms or ((99.0, stat.p99_ms),)
        lines += [_row(f"P{percentile_label(p)} {short} (ms)", v) for p, v in pcts]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def git_commit() -> str | None:
    """The checkout the benchmark client runs from, when it is a git work tree."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def _json_safe(value: Any) -> Any:
    # Strict JSON has no Infinity (request_rate defaults to inf); other values become strings if odd.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def build_result(m: BenchmarkMetrics, outputs: Sequence[RequestOutput], arguments: dict[str, Any],
                 label: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "git_commit": git_commit(),
        "label": label,
        "arguments": _json_safe(arguments),
        "num_prompts": len(outputs),
        "completed": m.completed,
        "failed": m.failed,
        "duration": m.duration_s,
        "total_input_tokens": m.total_input_tokens,
        "total_output_tokens": m.total_output_tokens,
        "request_throughput": m.request_throughput,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "max_output_tokens_per_s": m.max_output_tokens_per_s,
        "max_concurrent_requests": m.max_concurrent_requests,
    }
    for name in ("ttft", "tpot", "itl", "e2el"):
        stat = getattr(m, name)
        for stat_name, value in asdict(stat).items():  # mean_ms -> mean_ttft_ms, ...
            if stat_name != "percentiles_ms":
                result[f"{stat_name.removesuffix('_ms')}_{name}_ms"] = value
        for p, value in stat.percentiles_ms:  # p50_ttft_ms, p99.9_ttft_ms, ... as vLLM names them
            result[f"p{percentile_label(p)}_{name}_ms"] = value
    # Raw per-request data, in request order; times in seconds.
    result.update({
        "input_lens": m.input_lens,
        "output_lens": m.output_lens,
        "ttfts": [o.ttft if o.success else None for o in outputs],
        "itls": [o.itl for o in outputs],
        "e2els": [o.latency if o.success else None for o in outputs],
        "successes": [o.success for o in outputs],
        "errors": [o.error for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
    })
    return result


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
