"""The Helm chart with a sample GLMDeployment whose roles span nodes, rendered by Helm's own engine: it lints
clean, the CRD admits the sample, the operator's RBAC covers LeaderWorkerSets, and the sample becomes valid
LeaderWorkerSets."""

from __future__ import annotations

import helm_python as helm

from glmserve.operator import naming
from glmserve.operator.manifests import build_all
from glmserve.operator.spec import check_owner_name, parse_spec
from tests.k8s_operator import crd_validation, lws_schema
from tests.k8s_operator.chart_render import CHART, NAMESPACE, by_kind, render
from tests.k8s_operator.crd_validation import admit
from tests.k8s_operator.samples import GLM47_TWO_NODES

VALUES = {"sample": {"enabled": True, "name": "glm47", "spec": GLM47_TWO_NODES}}


def test_chart_with_a_two_node_sample():
    report = helm.lint(CHART, VALUES, strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    docs = render(VALUES)
    (sample,) = by_kind(docs, "GLMDeployment")
    assert admit(sample, cel=crd_validation.celpy is not None) == []
    (role,) = by_kind(docs, "ClusterRole")
    lws_rule = next(r for r in role["rules"] if r["apiGroups"] == ["leaderworkerset.x-k8s.io"])
    assert lws_rule["resources"] == ["leaderworkersets"]
    assert {"get", "create", "patch", "delete", "list", "watch"} == set(lws_rule["verbs"])

    owner = naming.Owner(sample["metadata"]["name"], NAMESPACE, "uid")
    spec = parse_spec(sample["spec"])
    check_owner_name(spec, owner.name)
    groups = [m for m in build_all(spec, owner, service_monitor_api=False) if m["kind"] == "LeaderWorkerSet"]
    assert [g["metadata"]["name"] for g in groups] == ["glm47-prefill-lws", "glm47-decode-lws"]
    for g in groups:
        assert lws_schema.schema_errors(g) == [] and lws_schema.webhook_errors(g) == []
