"""The shipped Grafana dashboard against the real services: `glmserve up` under load, scraped by a real
Prometheus; every dashboard query must return data, and no metric name may arrive mangled."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from glmserve.engine.tiny_model import build_tiny_model
from tests.k8s_operator.prometheus_harness import (PrometheusHarness, Target, empty_dashboard_queries, find_binary,
                                                   mangled_series)
from tests.serving.deployment import Deployment

pytestmark = [pytest.mark.skipif(find_binary() is None, reason="prometheus not installed (apt-get install prometheus)"),
              pytest.mark.timeout(300)]


def _load(base_url: str, stop: threading.Event) -> None:
    """Mixed traffic: shared prefixes (prefix-cache hits), streaming and not, until stopped."""
    shared = list(range(100, 164))
    i = 0
    with httpx.Client(base_url=base_url, timeout=60) as client:
        while not stop.is_set():
            i += 1
            client.post("/v1/completions", json={"prompt": shared + [i % 50 + 1], "max_tokens": 8,
                                                 "ignore_eos": True, "temperature": 0})
            client.post("/v1/chat/completions", json={  # a grammar: the structured-output panels
                "messages": [{"role": "user", "content": "json please"}], "max_tokens": 8,
                "response_format": {"type": "json_object"}})
            with client.stream("POST", "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 6, "stream": True,
                    "ignore_eos": True}) as r:
                for _ in r.iter_lines():
                    pass


def test_every_dashboard_query_returns_data_from_the_running_services(tmp_path):
    model_dir = build_tiny_model("glm4_moe", tmp_path / "model", seed=2)
    with Deployment(model_dir, prefill=1, decode=1, extra_args=("--dtype", "float32")) as dep:
        targets = [Target(f"127.0.0.1:{dep.port}", {"pod": "router-0"})]
        for name, (_, ready_url, _) in dep.processes.items():
            if name != "router":
                targets.append(Target(ready_url.split("//")[1].split("/")[0], {"pod": name}))
        stop = threading.Event()
        loader = threading.Thread(target=_load, args=(dep.base_url, stop), daemon=True)
        loader.start()
        try:
            with PrometheusHarness({"glmserve": targets}, workdir=tmp_path / "prom") as prom:
                prom.wait_for_targets(timeout=60)
                time.sleep(3)  # a few scrapes, so that rate() windows have two samples
                # MTP runs in one process only (not across prefill/decode yet): its panels get data in
                # tests/k8s_operator/test_prometheus_harness.py.
                empty = empty_dashboard_queries(prom, timeout=90, skip=("spec_decode_",))
                assert not mangled_series(prom)
        finally:
            stop.set()
            loader.join(timeout=60)
    assert not empty, "dashboard queries without data:\n" + "\n".join(f"{t}: {q}" for t, q in empty)
