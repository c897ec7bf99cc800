"""HorizontalPodAutoscalers for worker roles that ask for autoscaling."""

from __future__ import annotations

from typing import Any

from glmserve.metrics import METRICS, PREFIX
from glmserve.operator import naming
from glmserve.operator.spec import DeploymentSpec, RoleSpec


def custom_metric_name(metric: str) -> str:
    """Name under which a custom-metrics adapter serves a glmserve gauge to the HPA.

    The Prometheus series is `glmserve:<metric>`; adapters conventionally rename colons away (see
    docs/KUBERNETES.md for the prometheus-adapter rule).
    """
    assert metric in METRICS and METRICS[metric][0] == "gauge", metric
    return PREFIX.rstrip(":") + "_" + metric


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
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": a.min_replicas, "maxReplicas": a.max_replicas,
            "metrics": [metric],
            # Removing a worker means draining it and losing its cache: scale down slowly, one pod at a time.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300,
                                       "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]}},
        },
    }
