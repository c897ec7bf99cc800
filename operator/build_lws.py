"""LeaderWorkerSets: a worker role whose tensor-parallel group spans nodes. Each replica is a group of
`nodes` pods, one per node: the leader (rank 0 of the group: gRPC, HTTP, the torch.distributed rendezvous) and
nodes - 1 workers that only run their ranks. LWS gives every pod the leader's address and its own index in the
group; the worker args turn them into --dist-init-addr and --node-rank (args.py)."""

from __future__ import annotations

from typing import Any

from glmserve.operator import naming
from glmserve.operator.build_configmap import engine_config, section_hash
from glmserve.operator.build_deployment import worker_pod_spec
from glmserve.operator.spec import DeploymentSpec, RoleSpec

API_VERSION = "leaderworkerset.x-k8s.io/v1"
KIND = "LeaderWorkerSet"


def _template(spec: DeploymentSpec, owner: naming.Owner, role: RoleSpec, *, leader: bool,
              config_hash: str) -> dict[str, Any]:
    labels = naming.labels(owner.name, role.name, spec.image.tag)
    if leader:
        labels.update(naming.GROUP_LEADER_LABEL)
    return {"metadata": {"labels": labels, "annotations": {naming.CONFIG_HASH_ANNOTATION: config_hash}},
            "spec": worker_pod_spec(spec, owner, role, leader=leader)}


def build_worker_lws(spec: DeploymentSpec, owner: naming.Owner, role: RoleSpec) -> dict[str, Any]:
    config_hash = section_hash(engine_config(spec, owner)[role.name])
    body: dict[str, Any] = {
        "leaderWorkerTemplate": {
            "size": role.topology.nodes,
            # One rank gone leaves the others blocked in a collective: restart the group together.
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": _template(spec, owner, role, leader=True, config_hash=config_hash),
            "workerTemplate": _template(spec, owner, role, leader=False, config_hash=config_hash),
        },
        # GPUs are scarce: replace one group at a time, never surge a whole extra group of nodes.
        "rolloutStrategy": {"type": "RollingUpdate",
                            "rollingUpdateConfiguration": {"maxUnavailable": 1, "maxSurge": 0}},
        # Workers start with the leader, not after it is ready: the leader only becomes ready once every rank has
        # joined its rendezvous.
        "startupPolicy": "LeaderCreated",
    }
    if not role.autoscaling.enabled:  # with an autoscaler the HPA owns the group count (the LWS scale subresource)
        body = {"replicas": role.replicas, **body}
    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": naming.metadata(owner, naming.lws_name(owner.name, role.name), role.name, spec.image.tag),
            "spec": body}
