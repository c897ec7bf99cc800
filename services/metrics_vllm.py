"""`--metrics-compat vllm`: a worker's engine gauges and counters under vLLM's names as well.

The Gateway API Inference Extension's endpoint picker and KEDA's Prometheus scalers read vLLM servers by
these names (num_requests_waiting for queueing, kv_cache_usage_perc for KV pressure, cache_config_info for
prefix-cache-aware scoring), so a glmserve decode worker can sit in an InferencePool unchanged. The values
are read from the glmserve series at scrape time; nothing is counted twice.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from glmserve.metrics import ServiceMetrics

# vLLM name -> (glmserve name, kind). vLLM < 0.10 called the KV gauge gpu_cache_usage_perc; both are exported.
VLLM_NAMES: dict[str, tuple[str, str]] = {
    "vllm:num_requests_running": ("num_requests_running", "gauge"),
    "vllm:num_requests_waiting": ("num_requests_waiting", "gauge"),
    "vllm:kv_cache_usage_perc": ("kv_cache_usage_perc", "gauge"),
    "vllm:gpu_cache_usage_perc": ("kv_cache_usage_perc", "gauge"),
    "vllm:prompt_tokens": ("prompt_tokens", "counter"),
    "vllm:generation_tokens": ("generation_tokens", "counter"),
    "vllm:num_preemptions": ("num_preemptions", "counter"),
    "vllm:prefix_cache_queries": ("prefix_cache_queries", "counter"),
    "vllm:prefix_cache_hits": ("prefix_cache_hits", "counter"),
    # MTP speculative decoding (0 while it is off)
    "vllm:spec_decode_num_drafts": ("spec_decode_num_drafts", "counter"),
    "vllm:spec_decode_num_draft_tokens": ("spec_decode_num_draft_tokens", "counter"),
    "vllm:spec_decode_num_accepted_tokens": ("spec_decode_num_accepted_tokens", "counter"),
}
CACHE_CONFIG_INFO = "vllm:cache_config_info"


def _value(metrics: ServiceMetrics, name: str) -> float:
    """Sum of the glmserve series of one metric (one series per worker: labels role, model_name)."""
    family = next(iter(metrics._metrics[name].collect()))
    suffix = "_total" if family.type == "counter" else ""
    return sum(s.value for s in family.samples if s.name == family.name + suffix)


class VllmCompatCollector(Collector):
    def __init__(self, metrics: ServiceMetrics, cache_info: Callable[[], dict[str, str]]):
        self.metrics = metrics
        self.cache_info = cache_info  # block_size, num_gpu_blocks once the engine is loaded, else {}

    def collect(self) -> Iterator:
        labels = {"model_name": self.metrics.model_name, "engine": "0"}
        for vllm_name, (ours, kind) in VLLM_NAMES.items():
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                vllm_name, f"glmserve:{ours} under vLLM's name", labels=list(labels))
            family.add_metric(list(labels.values()), _value(self.metrics, ours))
            yield family
        info = self.cache_info()
        if info:
            family = GaugeMetricFamily(CACHE_CONFIG_INFO, "KV cache configuration (value 1).",
                                       labels=[*labels, *info])
            family.add_metric([*labels.values(), *info.values()], 1.0)
            yield family


def engine_cache_info(engine) -> dict[str, str]:
    if engine is None:
        return {}
    return {"block_size": str(engine.pool.block_size), "num_gpu_blocks": str(engine.pool.num_blocks)}


def install(metrics: ServiceMetrics, cache_info: Callable[[], dict[str, str]]) -> None:
    metrics.registry.register(VllmCompatCollector(metrics, cache_info))
