"""Deployments: the router and one per worker role (prefill, decode)."""

from __future__ import annotations

from typing import Any

from glmserve.operator import naming
from glmserve.operator.build_configmap import engine_config, section_hash
from glmserve.operator.pod import (ModelMount, apply_placement, container_security_context, gpu_resources,
                                   http_probes, image_pull_secrets, model_mount, pod_security_context, shm_volume)
from glmserve.operator.spec import DeploymentSpec, Placement, RoleSpec

ROUTER_GRACE_S = 30


def _deployment(owner: naming.Owner, name: str, component: str, spec: DeploymentSpec, replicas: int | None,
                strategy: dict[str, Any], pod_spec: dict[str, Any], config_hash: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "revisionHistoryLimit": 3,
        # Loading a large checkpoint can take many minutes; do not mark the rollout failed before that.
        "progressDeadlineSeconds": 1800,
        "selector": {"matchLabels": naming.selector_labels(owner.name, component)},
        "strategy": strategy,
        "template": {
            "metadata": {"labels": naming.labels(owner.name, component, spec.image.tag),
                         "annotations": {naming.CONFIG_HASH_ANNOTATION: config_hash}},
            "spec": pod_spec,
        },
    }
    if replicas is not None:
        body = {"replicas": replicas, **body}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": naming.metadata(owner, name, component, spec.image.tag), "spec": body}


def _pod_spec(spec: DeploymentSpec, mount: ModelMount, container: dict[str, Any], scratch_volume: dict[str, Any],
              placement: Placement, **settings: Any) -> dict[str, Any]:
    """The pod of every glmserve Deployment: the role's own `settings` first, then what all share."""
    pod_spec: dict[str, Any] = {
        **settings,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "initContainers": mount.init_containers,
        "containers": [container],
        "volumes": [*mount.volumes, scratch_volume],
    }
    if not pod_spec["initContainers"]:
        del pod_spec["initContainers"]
    if spec.image.pull_secrets:
        pod_spec["imagePullSecrets"] = image_pull_secrets(spec.image)
    apply_placement(pod_spec, placement)
    return pod_spec


def worker_pod_spec(spec: DeploymentSpec, owner: naming.Owner, role: RoleSpec, *, leader: bool = True) -> dict[str, Any]:
    """The pod of a worker: the whole worker on one node, or one node's share of a group spanning nodes.

    leader: the pod that serves gRPC and HTTP (the only pod of a one-node worker, rank 0 of a group); the other
    pods of a group run their ranks only, so they have no probes: a failing rank ends its process, and LWS then
    recreates the whole group.
    """
    mount = model_mount(spec.source, spec.image)
    config = engine_config(spec, owner)[role.name]
    ports: list[dict[str, Any]] = []
    if leader:
        ports += [{"name": "grpc", "containerPort": naming.GRPC_PORT[role.name], "protocol": "TCP"},
                  {"name": "http", "containerPort": naming.HTTP_PORT[role.name], "protocol": "TCP"}]
        if role.topology.multi_node:
            ports.append({"name": "dist", "containerPort": naming.DIST_INIT_PORT, "protocol": "TCP"})
    if role.name == "decode":  # every decode rank receives the KV heads it holds from the prefill ranks
        ports.append({"name": "kv", "containerPort": spec.kv_port, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": role.name,
        "image": spec.image.ref,
        "imagePullPolicy": spec.image.pull_policy,
        "command": ["glmserve"],
        "args": config["args"],
        "ports": ports,
        **(http_probes("http", "/ready") if leader else {}),
        "resources": gpu_resources(role.placement.resources, role.topology.gpus_per_pod, role.gpu_resource_name),
        "volumeMounts": [mount.mount, {"name": "dshm", "mountPath": "/dev/shm"}],
        # JIT caches (Triton, FlashInfer, torch) write under HOME, so the root filesystem stays writable.
        "securityContext": container_security_context(read_only_root=False),
    }
    container["env"] = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        *(dict(e) for e in role.env)]
    return _pod_spec(
        spec, mount, container, shm_volume(role.shm_size), role.placement,
        # A draining worker finishes its running requests (drainTimeoutSeconds) before the grace period ends.
        terminationGracePeriodSeconds=role.termination_grace_s,
        automountServiceAccountToken=False)  # workers never call the Kubernetes API


def build_worker_deployment(spec: DeploymentSpec, owner: naming.Owner, role: RoleSpec) -> dict[str, Any]:
    pod_spec = worker_pod_spec(spec, owner, role)
    # GPUs are scarce: replace pods one at a time instead of surging onto GPUs that may not exist.
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    # With an autoscaler the HPA owns the replica count; leave it out of what the operator applies.
    replicas = None if role.autoscaling.enabled else role.replicas
    return _deployment(owner, naming.role_name(owner.name, role.name), role.name, spec, replicas, strategy,
                       pod_spec, section_hash(engine_config(spec, owner)[role.name]))


def build_router_deployment(spec: DeploymentSpec, owner: naming.Owner) -> dict[str, Any]:
    r = spec.router
    mount = model_mount(spec.source, spec.image, tokenizer_only=True)
    config = engine_config(spec, owner)["router"]
    container = {
        "name": "router",
        "image": spec.image.ref,
        "imagePullPolicy": spec.image.pull_policy,
        "command": ["glmserve"],
        "args": config["args"],
        "ports": [{"name": "http", "containerPort": r.http_port, "protocol": "TCP"}],
        **http_probes("http", "/health"),
        "resources": dict(r.placement.resources),
        "volumeMounts": [mount.mount, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": container_security_context(read_only_root=True),
    }
    pod_spec = _pod_spec(
        spec, mount, container, {"name": "tmp", "emptyDir": {}}, r.placement,
        serviceAccountName=naming.router_name(owner.name),  # may list and watch EndpointSlices (build_rbac)
        terminationGracePeriodSeconds=ROUTER_GRACE_S)
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    return _deployment(owner, naming.router_name(owner.name), "router", spec, r.replicas, strategy, pod_spec,
                       section_hash(config))
