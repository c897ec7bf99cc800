"""The Prometheus metrics every glmserve service exports (prefix `glmserve:`).

This module is the single list of metric names: services create them through `ServiceMetrics`, and the
Grafana dashboard, the alert rules and their tests read the names from here. It imports only
prometheus_client, so the operator (no torch) may import it too.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "glmserve:"

# Histogram buckets in seconds, spanning CPU test runs to fast GPU decode.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)

# name (without prefix) -> (type, help, label names). Every series also carries `role` and `model_name`.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # Router (request-level, what the client sees)
    "time_to_first_token_seconds": ("histogram", "Time from request arrival to the first token.", ()),
    "inter_token_latency_seconds": ("histogram", "Time between consecutive streamed tokens.", ()),
    "e2e_request_latency_seconds": ("histogram", "Time from request arrival to its last token.", ()),
    "request_success": ("counter", "Finished requests by finish reason.", ("finished_reason",)),
    "request_failure": ("counter", "Failed requests by error kind.", ("error",)),
    "worker_healthy": ("gauge", "1 when the router sees the worker healthy.", ("worker", "worker_role")),
    # Workers and router
    "request_queue_time_seconds": ("histogram", "Time a request waited before it was scheduled.", ()),
    "num_requests_running": ("gauge", "Requests being computed.", ()),
    "num_requests_waiting": ("gauge", "Requests queued, not yet scheduled.", ()),
    "num_queued_tokens": ("gauge", "Prompt tokens waiting to be prefilled.", ()),
    "kv_cache_usage_perc": ("gauge", "Fraction of KV blocks in use (0-1).", ()),
    "prefix_cache_queries": ("counter", "Prompt tokens looked up in the prefix cache.", ()),
    "prefix_cache_hits": ("counter", "Prompt tokens found in the prefix cache.", ()),
    "prompt_tokens": ("counter", "Prompt tokens processed.", ()),
    "generation_tokens": ("counter", "Tokens generated.", ()),
    "num_preemptions": ("counter", "Requests preempted for lack of KV blocks.", ()),
    # MTP speculative decoding (vLLM's spec_decode_* meaning)
    "spec_decode_num_drafts": ("counter", "Verify steps that checked at least one draft token.", ()),
    "spec_decode_num_draft_tokens": ("counter", "Draft tokens proposed and verified.", ()),
    "spec_decode_num_accepted_tokens": ("counter", "Draft tokens accepted.", ()),
    "spec_decode_num_accepted_tokens_per_pos": ("counter", "Draft tokens accepted at each draft position.",
                                                ("position",)),
    # KV transfer, per (prefill, decode) link
    "kv_transfer_bytes": ("counter", "KV cache bytes moved over a link.", ("link", "direction")),
    "kv_transfer_latency_seconds": ("histogram", "Time to move one request's KV over a link.", ("link",)),
    "kv_transfer_failures": ("counter", "Failed KV transfers.", ("link",)),
    "kv_transfer_reused_tokens": ("counter", "Prompt tokens a decode worker took from its own prefix cache "
                                  "instead of receiving them over the KV link.", ()),
    # Structured output (grammar-constrained decoding)
    "structured_output_requests": ("counter", "Requests with a grammar (router), by grammar kind.", ("kind",)),
    "grammar_compile_seconds": ("histogram", "Time to compile one grammar (cache misses; workers).", ()),
}

_TYPES = {"histogram": Histogram, "counter": Counter, "gauge": Gauge}


def exported_names() -> set[str]:
    """Series names as Prometheus exposes them (counters gain `_total`, histograms `_bucket/_sum/_count`)."""
    out: set[str] = set()
    for name, (kind, _, _) in METRICS.items():
        full = PREFIX + name
        if kind == "counter":
            out.add(full + "_total")
        elif kind == "histogram":
            out.update({full + "_bucket", full + "_sum", full + "_count"})
        else:
            out.add(full)
    return out


class ServiceMetrics:
    """The metric objects of one service, in its own registry, labelled with its role and model."""

    def __init__(self, role: str, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.role = role
        self.model_name = model_name
        self._metrics = {}
        for name, (kind, doc, labels) in METRICS.items():
            kwargs = {"buckets": LATENCY_BUCKETS} if kind == "histogram" else {}
            self._metrics[name] = _TYPES[kind](
                PREFIX + name, doc, ("role", "model_name", *labels), registry=self.registry, **kwargs
            )

    def get(self, name: str, **labels: str):
        return self._metrics[name].labels(role=self.role, model_name=self.model_name, **labels)
