"""HorizontalPodAutoscalers for worker roles that ask for autoscaling."""

from __future__ import annotations

from typing import Any

from glmserve.metrics import METRICS, PREFIX
from glmserve.operator import naming
from glmserve.operator.build_lws import API_VERSION as LWS_API_VERSION
from glmserve.operator.build_lws import KIND as LWS_KIND
from glmserve.operator.spec import DeploymentSpec, RoleSpec


def custom_metric_name(metric: str) -> str:
    """Name under which a custom-metrics adapter serves a glmserve gauge to the HPA.

    The Prometheus series is `glmserve:<metric>`; adapters conventionally rename colons away (see
    docs/KUBERNETES.md for the prometheus-adapter rule).
    """
    assert metric in METRICS and METRICS[metric][0] == "gauge", metric
    return PREFIX.rstrip(":") + "_" + metric


def _scale_target(owner: naming.Owner, role: RoleSpec) -> dict[str, str]:
    # A LeaderWorkerSet scales whole groups; its scale subresource selects the leaders, which export the metrics.
    if role.topology.multi_node:
        return {"apiVersion": LWS_API_VERSION, "kind": LWS_KIND, "name": naming.lws_name(owner.name, role.name)}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": naming.role_name(owner.name, role.name)}


def build_worker_hpa(spec: DeploymentSpec, owner: naming.Owner, role: RoleSpec) -> dict[str, Any]:
    a = role.autoscaling
    if a.metric == "cpu":
        metric = {"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": a.target_cpu_utilization or 80}}}
    else:
        metric = {"type": "Pods", "pods": {"metric": {"name": custom_metric_name(a.metric)},
                                           "target": {"type": "AverageValue",
                                                      "averageValue": a.target_average_value or "1"}}}
    name = naming.role_name(owner.name, role.name)
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": naming.metadata(owner, name, role.name, spec.image.tag),
        "spec": {
            "scaleTargetRef": _scale_target(owner, role),
            "minReplicas": a.min_replicas, "maxReplicas": a.max_replicas,
            "metrics": [metric],
            # Removing a worker means draining it and losing its cache: scale down slowly, one pod at a time.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300,
                                       "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]}},
        },
    }
