"""Every child object of a GLMDeployment, from its spec: a pure function, apart from the kopf handlers."""

from __future__ import annotations

from typing import Any, NamedTuple

from glmserve.operator import naming
from glmserve.operator.build_configmap import build_engine_configmap
from glmserve.operator.build_deployment import build_router_deployment, build_worker_deployment
from glmserve.operator.build_hpa import build_worker_hpa
from glmserve.operator.build_lws import API_VERSION as LWS_API_VERSION
from glmserve.operator.build_lws import KIND as LWS_KIND
from glmserve.operator.build_lws import build_worker_lws
from glmserve.operator.build_pdb import build_router_pdb, build_worker_pdb
from glmserve.operator.build_rbac import (build_router_role, build_router_role_binding,
                                          build_router_service_account)
from glmserve.operator.build_service import build_router_service, build_worker_service
from glmserve.operator.build_servicemonitor import GROUP_VERSION as SERVICE_MONITOR_API
from glmserve.operator.build_servicemonitor import build_service_monitor
from glmserve.operator.spec import DeploymentSpec, RoleSpec


class ChildKey(NamedTuple):
    api_version: str
    kind: str
    name: str


def build_all(spec: DeploymentSpec, owner: naming.Owner, *, service_monitor_api: bool) -> list[dict[str, Any]]:
    """The desired children, in the order they should be applied (identities and config before workloads).

    `service_monitor_api`: whether the cluster serves monitoring.coreos.com/v1 ServiceMonitors.
    """
    out = [
        build_router_service_account(spec, owner), build_router_role(spec, owner),
        build_router_role_binding(spec, owner),
        build_engine_configmap(spec, owner),
        build_worker_service(spec, owner, spec.prefill), build_worker_service(spec, owner, spec.decode),
        build_router_service(spec, owner),
        build_worker_workload(spec, owner, spec.prefill), build_worker_workload(spec, owner, spec.decode),
        build_router_deployment(spec, owner),
        build_router_pdb(spec, owner),
    ]
    for role in (spec.prefill, spec.decode):
        if role.pdb_enabled:
            out.append(build_worker_pdb(spec, owner, role))
        if role.autoscaling.enabled:
            out.append(build_worker_hpa(spec, owner, role))
    if spec.monitoring.service_monitor and service_monitor_api:
        out.append(build_service_monitor(spec, owner))
    return out


def build_worker_workload(spec: DeploymentSpec, owner: naming.Owner, role: RoleSpec) -> dict[str, Any]:
    """A Deployment when a worker fits on one node, a LeaderWorkerSet when its group spans nodes."""
    if role.topology.multi_node:
        return build_worker_lws(spec, owner, role)
    return build_worker_deployment(spec, owner, role)


def possible_children(owner_name: str) -> list[ChildKey]:
    """Every child any spec could produce: what is not desired now is deleted (e.g. an HPA after autoscaling
    was switched off), and all of them go when the GLMDeployment is deleted."""
    router = naming.router_name(owner_name)
    keys = [ChildKey("v1", "ServiceAccount", router),
            ChildKey("rbac.authorization.k8s.io/v1", "Role", router),
            ChildKey("rbac.authorization.k8s.io/v1", "RoleBinding", router),
            ChildKey("v1", "ConfigMap", naming.engine_configmap_name(owner_name)),
            ChildKey("v1", "Service", naming.router_service_name(owner_name)),
            ChildKey("apps/v1", "Deployment", router),
            ChildKey("policy/v1", "PodDisruptionBudget", router),
            ChildKey(SERVICE_MONITOR_API, "ServiceMonitor", naming.service_monitor_name(owner_name))]
    for role in ("prefill", "decode"):
        name = naming.role_name(owner_name, role)
        keys += [ChildKey("v1", "Service", name), ChildKey("apps/v1", "Deployment", name),
                 ChildKey(LWS_API_VERSION, LWS_KIND, naming.lws_name(owner_name, role)),
                 ChildKey("policy/v1", "PodDisruptionBudget", name),
                 ChildKey("autoscaling/v2", "HorizontalPodAutoscaler", name)]
    return keys


def key_of(manifest: dict[str, Any]) -> ChildKey:
    return ChildKey(manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"])
