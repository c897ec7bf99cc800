"""--metrics-compat vllm: the vLLM-named series carry the glmserve values, as Prometheus' own text
parser reads them."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from glmserve.metrics import ServiceMetrics
from glmserve.metrics_vllm import VLLM_NAMES, install


def _samples(metrics: ServiceMetrics) -> dict:
    text = generate_latest(metrics.registry).decode()
    return {s.name: s for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_vllm_names_follow_glmserve_values():
    m = ServiceMetrics("decode", "glm")
    info = {}
    install(m, lambda: info)
    m.get("num_requests_waiting").set(3)
    m.get("num_requests_running").set(5)
    m.get("kv_cache_usage_perc").set(0.25)
    m.get("generation_tokens").inc(42)
    s = _samples(m)
    assert s["vllm:num_requests_waiting"].value == 3 and s["vllm:num_requests_running"].value == 5
    assert s["vllm:kv_cache_usage_perc"].value == 0.25 == s["vllm:gpu_cache_usage_perc"].value
    assert s["vllm:generation_tokens_total"].value == 42 and s["vllm:prompt_tokens_total"].value == 0
    assert s["vllm:num_requests_waiting"].labels["model_name"] == "glm"
    assert "vllm:cache_config_info" not in s  # no engine yet
    info.update(block_size="16", num_gpu_blocks="1000")
    assert _samples(m)["vllm:cache_config_info"].labels["num_gpu_blocks"] == "1000"
    names = {n if kind == "gauge" else n + "_total" for n, (_, kind) in VLLM_NAMES.items()}
    assert names <= set(s)
