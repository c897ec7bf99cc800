"""The router's identity: a ServiceAccount allowed to read the EndpointSlices of its own namespace, which is how
it discovers prefill and decode pods."""

from __future__ import annotations

from typing import Any

from glmserve.operator import naming
from glmserve.operator.spec import DeploymentSpec

ROUTER_RULES = [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                 "verbs": ["get", "list", "watch"]}]


def build_router_service_account(spec: DeploymentSpec, owner: naming.Owner) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": naming.metadata(owner, naming.router_name(owner.name), "router", spec.image.tag)}


def build_router_role(spec: DeploymentSpec, owner: naming.Owner) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": naming.metadata(owner, naming.router_name(owner.name), "router", spec.image.tag),
            "rules": [dict(r) for r in ROUTER_RULES]}


def build_router_role_binding(spec: DeploymentSpec, owner: naming.Owner) -> dict[str, Any]:
    name = naming.router_name(owner.name)
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": naming.metadata(owner, name, "router", spec.image.tag),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}]}
