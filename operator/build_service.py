"""Services: the router's client-facing Service and a headless Service per worker role, whose EndpointSlices
the router watches to find ready workers."""

from __future__ import annotations

from typing import Any

from glmserve.operator import naming
from glmserve.operator.spec import DeploymentSpec, RoleSpec


def build_router_service(spec: DeploymentSpec, owner: naming.Owner) -> dict[str, Any]:
    r = spec.router
    port: dict[str, Any] = {"name": "http", "port": r.service_port, "targetPort": "http", "protocol": "TCP"}
    if r.node_port is not None:
        port["nodePort"] = r.node_port
    meta = naming.metadata(owner, naming.router_service_name(owner.name), "router", spec.image.tag)
    if r.service_annotations:
        meta["annotations"] = dict(r.service_annotations)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"type": r.service_type, "selector": naming.selector_labels(owner.name, "router"),
                     "ports": [port]}}


def build_worker_service(spec: DeploymentSpec, owner: naming.Owner, role: RoleSpec) -> dict[str, Any]:
    ports = [{"name": "grpc", "port": naming.GRPC_PORT[role.name], "targetPort": "grpc", "protocol": "TCP"},
             {"name": "http", "port": naming.HTTP_PORT[role.name], "targetPort": "http", "protocol": "TCP"}]
    if role.name == "decode":
        ports.append({"name": "kv", "port": spec.kv_port, "targetPort": "kv", "protocol": "TCP"})
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": naming.metadata(owner, naming.role_name(owner.name, role.name), role.name, spec.image.tag),
        "spec": {
            "clusterIP": "None",  # headless: the router talks to each pod, not to a load-balanced VIP
            # Only ready pods: a loading or draining worker must not receive requests.
            "publishNotReadyAddresses": False,
            # A group spanning nodes is one worker: only its leader serves gRPC, so only leaders are endpoints.
            "selector": {**naming.selector_labels(owner.name, role.name),
                         **(naming.GROUP_LEADER_LABEL if role.topology.multi_node else {})},
            "ports": ports,
        },
    }
