"""Names, labels and owner references shared by every child object of a GLMDeployment."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from glmserve.operator.schema import API_VERSION, KIND

MANAGED_BY = "glmserve-operator"
PART_OF = "glmserve"
APP_NAME = "glmserve"

# Container ports: the service contract's defaults (docs/SERVICES.md); pods own their network namespace, so
# fixed ports never clash.
GRPC_PORT = {"prefill": 50061, "decode": 50071}
HTTP_PORT = {"prefill": 8101, "decode": 8201}
# Where the leader of a group spanning nodes hosts the torch.distributed rendezvous (--dist-init-addr).
DIST_INIT_PORT = 29500

# Annotation holding the hash of the desired manifest, so an unchanged child is never written again.
SPEC_HASH_ANNOTATION = "glmserve.io/spec-hash"
CONFIG_HASH_ANNOTATION = "glmserve.io/engine-config-hash"


@dataclass(frozen=True)
class Owner:
    """The GLMDeployment a child belongs to."""

    name: str
    namespace: str
    uid: str
    generation: int = 1

    @classmethod
    def from_body(cls, body: Any) -> Owner:
        meta = body["metadata"]
        return cls(meta["name"], meta["namespace"], meta["uid"], int(meta.get("generation") or 1))

    def owner_reference(self) -> dict[str, Any]:
        # controller=True lets `kubectl` and the garbage collector treat the GLMDeployment as the owner.
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


def router_service_name(owner: str) -> str:
    return owner  # what clients use: http://<name>.<namespace>.svc


def router_name(owner: str) -> str:
    return f"{owner}-router"


def role_name(owner: str, role: str) -> str:
    """Deployment, headless Service, PodDisruptionBudget and HPA of a worker role share this name."""
    return f"{owner}-{role}"


# A role that spans nodes is a LeaderWorkerSet. LWS names a StatefulSet `<lws>-<group>` per group (group < 256,
# the CRD's replicas bound) and the StatefulSet controller labels its pods controller-revision-hash =
# `<statefulset>-<hash of up to 10 characters>`, a label value of at most 63: so `<lws>` may have 63 - 11 - 4 = 48
# characters, and the owner 48 - len("-prefill-lws") = 36 (the CRD's CEL rule says the same).
LWS_SUFFIX = "-lws"
MAX_LWS_NAME = 48
MAX_OWNER_NAME_MULTI_NODE = MAX_LWS_NAME - len("-prefill") - len(LWS_SUFFIX)

# Our own mark on the leader template: the role's headless Service selects leaders only, so the router sees one
# address per group (the rank that serves gRPC), never the ranks that only compute.
GROUP_LEADER_LABEL = {"glmserve.io/group-rank": "leader"}


def lws_name(owner: str, role: str) -> str:
    """The LeaderWorkerSet of a role spanning nodes: not the role's name, because LWS creates a headless Service
    named after itself (for its pods' DNS names) and the role's own Service, `role_name`, selects leaders only."""
    return f"{owner}-{role}{LWS_SUFFIX}"


def engine_configmap_name(owner: str) -> str:
    return f"{owner}-engine"


def service_monitor_name(owner: str) -> str:
    return owner


def selector_labels(owner: str, component: str) -> dict[str, str]:
    """The immutable subset used in selectors (never include the version: selectors cannot change)."""
    return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": owner,
            "app.kubernetes.io/component": component}


def labels(owner: str, component: str, version: str) -> dict[str, str]:
    return {**selector_labels(owner, component), "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/version": label_value(version)}


def label_value(text: str) -> str:
    """Coerce text into a valid label value (63 chars of [A-Za-z0-9._-], alphanumeric at both ends)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:63]
    return cleaned.strip("._-")


def metadata(owner: Owner, name: str, component: str, version: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": labels(owner.name, component, version),
            "ownerReferences": [owner.owner_reference()], **extra}
