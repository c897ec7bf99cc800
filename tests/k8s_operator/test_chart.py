"""The Helm chart, rendered by Helm's own engine: lints clean in strict mode, every manifest validates for default
and non-default values, optional parts follow their flags, and the operator's RBAC is exactly what it uses."""

from __future__ import annotations

import json

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from glmserve.operator.build_rbac import ROUTER_RULES
from glmserve.operator.kube import PLURALS
from glmserve.operator.manifests import possible_children
from tests.k8s_operator import crd_validation
from tests.k8s_operator.chart_render import CHART, NAMESPACE, by_kind, render
from tests.k8s_operator.crd_validation import admit
from tests.k8s_operator.monitoring_schemas import PROMETHEUS_RULE_SCHEMA, SERVICE_MONITOR_SCHEMA

EVERYTHING_ON = {
    "fullnameOverride": "glmserve",
    "operator": {"image": {"tag": "0.2.0", "pullPolicy": "Always"}, "imagePullSecrets": [{"name": "regcred"}],
                 "watchNamespace": "inference", "logLevel": "DEBUG", "nodeSelector": {"pool": "system"},
                 "tolerations": [{"key": "dedicated", "operator": "Exists"}], "podAnnotations": {"a": "b"},
                 "priorityClassName": "system-cluster-critical"},
    "serviceAccount": {"name": "glm-operator", "annotations": {"iam": "role"}},
    "monitoring": {"dashboard": {"namespace": "monitoring", "label": "grafana_dashboard", "labelValue": "yes"},
                   "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                                      "ttftP90Seconds": 2.5},
                   "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "sample": {"enabled": True, "name": "glm-sample"},
}
EVERYTHING_OFF = {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing"},
                  "monitoring": {"dashboard": {"enabled": False}, "prometheusRule": {"enabled": False}}}
VALUE_SETS = {"default": None, "everything-on": EVERYTHING_ON, "everything-off": EVERYTHING_OFF}
OWN_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR_SCHEMA, "PrometheusRule": PROMETHEUS_RULE_SCHEMA}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lints_clean_in_strict_mode(name):
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_manifest_validates(name):
    docs = render(VALUE_SETS[name])
    assert docs
    for doc in docs:
        if doc["kind"] in OWN_SCHEMAS:
            jsonschema.validate(doc, OWN_SCHEMAS[doc["kind"]])
        elif doc["kind"] == "GLMDeployment":
            assert admit(doc, cel=crd_validation.celpy is not None) == []
        else:
            for version in ("1.29", "1.35"):
                kubernetes_validate.validate(doc, version, strict=True)
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "glmserve" and labels["app.kubernetes.io/managed-by"] == "Helm"


def test_crd_ships_in_crds_dir():
    with helm.Chart.load(CHART) as chart:
        (crd,) = chart.crds
    assert yaml.safe_load(crd["data"])["metadata"]["name"] == "glmdeployments.glmserve.io"


def test_defaults_install_operator_and_dashboard_only():
    docs = render()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "ServiceAccount"]
    (dep,) = by_kind(docs, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["glmserve"] and c["args"] == ["--log-level", "INFO", "operator", "--all-namespaces"]
    assert c["image"] == "ghcr.io/glmserve/glmserve:0.1.0"
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "glm-glmserve"
    # No prometheus-operator API offline, so the "auto" PrometheusRule stays out.
    assert not by_kind(docs, "PrometheusRule") and not by_kind(docs, "GLMDeployment")


def test_non_default_values_reach_the_manifests():
    docs = render(EVERYTHING_ON)
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == ["--log-level", "DEBUG", "operator", "--namespace", "inference"]
    assert pod["containers"][0]["image"] == "ghcr.io/glmserve/glmserve:0.2.0"
    assert pod["serviceAccountName"] == "glm-operator" and pod["nodeSelector"] == {"pool": "system"}
    assert pod["priorityClassName"] == "system-cluster-critical" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    (role,) = by_kind(docs, "Role")
    (binding,) = by_kind(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "inference"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "glm-operator", "namespace": NAMESPACE}]
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")  # nothing cluster-wide
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    ttft = next(r for r in rule["spec"]["groups"][0]["rules"] if r["alert"] == "GlmserveTTFTHigh")
    assert ttft["expr"].strip().endswith("> 2.5")
    assert "{{ $labels.model_name }}" in ttft["annotations"]["summary"]  # left for Prometheus, not eaten by Helm
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["inference"]}
    (sample,) = by_kind(docs, "GLMDeployment")
    assert sample["metadata"]["name"] == "glm-sample" and sample["spec"]["model"]["name"] == "GLM-4.7-Flash"
    (dash,) = by_kind(docs, "ConfigMap")
    assert dash["metadata"]["namespace"] == "monitoring" and dash["metadata"]["labels"]["grafana_dashboard"] == "yes"


def test_everything_off_leaves_only_the_operator():
    docs = render(EVERYTHING_OFF)
    assert sorted(d["kind"] for d in docs) == ["Deployment"]
    assert docs[0]["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


def test_dashboard_configmap_carries_the_dashboard_for_the_sidecar():
    (dash,) = by_kind(render(), "ConfigMap")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["glmserve.json"]) == json.loads((CHART / "dashboards/glmserve.json").read_text())


def test_values_schema_rejects_bad_values():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(EVERYTHING_ON)
        for bad in ({"operator": {"logLevel": "LOUD"}}, {"monitoring": {"prometheusRule": {"enabled": "maybe"}}},
                    {"operator": {"watchNamespace": "Not_A_Namespace"}}, {"unknownKey": 1},
                    {"sample": {"name": "x" * 60}}):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)


def _grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def _required() -> set[tuple[str, str, str]]:
    """What the operator calls, derived from the code where it can be."""
    need: set[tuple[str, str, str]] = set()
    for key in possible_children("x"):  # get, create, server-side apply (patch), delete of every child kind
        group = key.api_version.rpartition("/")[0]
        need |= {(group, PLURALS[(key.api_version, key.kind)], v) for v in ("get", "create", "patch", "delete")}
    need |= {("apps", "deployments", v) for v in ("list", "watch")}  # status follows the Deployments (kopf watch)
    need |= {("leaderworkerset.x-k8s.io", "leaderworkersets", v) for v in ("list", "watch")}  # and LeaderWorkerSets
    need |= {("glmserve.io", "glmdeployments", v) for v in ("get", "list", "watch", "patch")}  # kopf + refresh
    need |= {("glmserve.io", "glmdeployments/status", "patch"), ("", "events", "create")}
    need |= _grants(ROUTER_RULES)  # RBAC lets the operator grant the router only what it holds itself
    return need


def test_operator_rbac_is_exactly_what_it_uses():
    docs = render()
    (role,) = by_kind(docs, "ClusterRole")
    granted = _grants(role["rules"])
    assert granted == _required(), (granted ^ _required())
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "glm-glmserve"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "glm-glmserve", "namespace": NAMESPACE}]
