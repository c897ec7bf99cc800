"""PodDisruptionBudgets: node drains take worker pods down a few at a time, never a whole role at once."""

from __future__ import annotations

from typing import Any

from glmserve.operator import naming
from glmserve.operator.spec import DeploymentSpec, RoleSpec


def _pdb(spec: DeploymentSpec, owner: naming.Owner, name: str, component: str, max_unavailable: int) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": naming.metadata(owner, name, component, spec.image.tag),
            "spec": {"maxUnavailable": max_unavailable,
                     "selector": {"matchLabels": naming.selector_labels(owner.name, component)}}}


def build_worker_pdb(spec: DeploymentSpec, owner: naming.Owner, role: RoleSpec) -> dict[str, Any]:
    return _pdb(spec, owner, naming.role_name(owner.name, role.name), role.name, role.pdb_max_unavailable)


def build_router_pdb(spec: DeploymentSpec, owner: naming.Owner) -> dict[str, Any]:
    return _pdb(spec, owner, naming.router_name(owner.name), "router", 1)
