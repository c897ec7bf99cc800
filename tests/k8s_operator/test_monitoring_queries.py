"""Dashboard and alert queries name only metrics the services export (services/metrics.py), cover every one of
them, and the alert rules pass Prometheus' own checker (promtool)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from glmserve.metrics import METRICS, PREFIX, exported_names
from tests.k8s_operator.chart_render import by_kind, render
from tests.k8s_operator.promql import dashboard, dashboard_panels, dashboard_queries, metric_names, variable_queries

ALERTS = {"GlmserveTTFTHigh", "GlmserveKVCacheExhausted", "GlmserveWorkerDown", "GlmserveKVTransferFailures"}


def alert_rules() -> list[dict]:
    (rule,) = by_kind(render({"monitoring": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    return rule["spec"]["groups"][0]["rules"]


def test_metric_name_extraction():
    expr = 'histogram_quantile(0.9, sum by (le, pod) (rate(glmserve:ttft_bucket{role="router", x=~"a|b"}[5m]))) ' \
           '/ on (pod) group_left sum(up) > bool 0.5 or vector(1)'
    assert metric_names(expr) == {"glmserve:ttft_bucket", "up"}
    assert metric_names("max(glmserve:kv_cache_usage_perc) > 0.95") == {"glmserve:kv_cache_usage_perc"}


def test_dashboard_queries_use_only_exported_metrics():
    exported = exported_names()
    queries = dashboard_queries() + [("variable", q) for q in variable_queries()]
    assert len(queries) > 20
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: {expr} selects no metric"
        assert names <= exported, f"{title}: unknown {names - exported}"


def test_dashboard_covers_every_metric_and_a_per_pod_breakdown():
    used = {n for _, e in dashboard_queries() for n in metric_names(e)}
    families = {n.removeprefix(PREFIX).removesuffix("_total").removesuffix("_bucket") for n in used}
    assert families >= set(METRICS), set(METRICS) - families
    per_pod = [t for t, e in dashboard_queries() if "by (pod" in e]
    assert len(per_pod) >= 4
    titles = " ".join(p["title"].lower() for p in dashboard_panels())
    for needed in ("request rate", "time to first token", "inter-token", "end-to-end", "tokens per second",
                   "running", "waiting", "kv cache usage", "prefix cache hit", "kv transfer bandwidth",
                   "kv transfer latency", "kv transfer failures"):
        assert needed in titles, needed


def test_dashboard_is_well_formed():
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "namespace", "model_name"]


def test_alerts_are_the_four_kinds_on_exported_metrics():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for r in rules:
        names = metric_names(r["expr"])
        assert names and names <= exported_names(), (r["alert"], names)
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "glmserve", "rules": alert_rules()}]}))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 rules found" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "sum(rate(x[5m]"}]}]}))
    assert subprocess.run(["promtool", "check", "rules", str(bad)], capture_output=True, timeout=30).returncode != 0
