"""The prometheus-operator ServiceMonitor that scrapes /metrics of the router and both worker roles."""

from __future__ import annotations

from typing import Any

from glmserve.operator import naming
from glmserve.operator.spec import DeploymentSpec

GROUP_VERSION = "monitoring.coreos.com/v1"


def build_service_monitor(spec: DeploymentSpec, owner: naming.Owner) -> dict[str, Any]:
    meta = naming.metadata(owner, naming.service_monitor_name(owner.name), "monitoring", spec.image.tag)
    meta["labels"] = {**spec.monitoring.labels, **meta["labels"]}
    return {
        "apiVersion": GROUP_VERSION, "kind": "ServiceMonitor", "metadata": meta,
        "spec": {
            # The three Services of this GLMDeployment (router and the two headless worker Services).
            "selector": {"matchLabels": {"app.kubernetes.io/instance": owner.name,
                                         "app.kubernetes.io/managed-by": naming.MANAGED_BY},
                         "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In",
                                               "values": ["router", "prefill", "decode"]}]},
            "namespaceSelector": {"matchNames": [owner.namespace]},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": spec.monitoring.interval,
                           "scheme": "http"}],
        },
    }
