"""Make the children of one GLMDeployment match its spec, and read back their state. Idempotent: a child whose
desired manifest is unchanged (same hash annotation) is not written, so a restarted operator or a decode-only
scale touches nothing else."""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from glmserve.operator import naming
from glmserve.operator.build_lws import API_VERSION as LWS_API
from glmserve.operator.build_servicemonitor import GROUP_VERSION as SERVICE_MONITOR_API
from glmserve.operator.conditions import Failure, compute_status
from glmserve.operator.kube import KubeApi
from glmserve.operator.manifests import ChildKey, build_all, key_of, possible_children
from glmserve.operator.schema import API_VERSION, KIND
from glmserve.operator.spec import DeploymentSpec, SpecError, check_owner_name, parse_spec

# Degraded reasons that come from reconciling (not from the children): kept until a reconcile succeeds.
RECONCILE_REASONS = ("ReconcileFailed", "InvalidSpec")


class OwnershipError(Exception):
    """A child's name is taken by an object this GLMDeployment does not own."""


class MissingApiError(Exception):
    """The spec needs a kind the cluster does not serve (LeaderWorkerSet without the LWS controller)."""


# Child kinds that come from add-ons a cluster may lack: (apiVersion, plural).
OPTIONAL_APIS = {SERVICE_MONITOR_API: "servicemonitors", LWS_API: "leaderworkersets"}


def _require_lws(api: KubeApi, spec: DeploymentSpec) -> None:
    spanning = [r for r in (spec.prefill, spec.decode) if r.topology.multi_node]
    if spanning and not api.serves(LWS_API, "leaderworkersets"):
        what = "; ".join(f"{r.name} spans {r.topology.nodes} nodes (tensorParallelSize {r.tensor_parallel_size}, "
                         f"gpusPerNode {r.gpus_per_node})" for r in spanning)
        raise MissingApiError(f"{what}, which needs the LeaderWorkerSet API ({LWS_API}) and it is not installed: "
                              "install LWS (https://github.com/kubernetes-sigs/lws) or make each worker fit on one node")


@dataclass
class Outcome:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted)

    def summary(self) -> str:
        parts = [f"{verb} {', '.join(names)}" for verb, names in
                 (("created", self.created), ("updated", self.updated), ("deleted", self.deleted)) if names]
        return "; ".join(parts) or "nothing to change"


def with_hash(manifest: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]
    out["metadata"].setdefault("annotations", {})[naming.SPEC_HASH_ANNOTATION] = digest
    return out


def _label(key: ChildKey) -> str:
    return f"{key.kind}/{key.name}"


def _owned_by(obj: dict[str, Any], owner: naming.Owner) -> bool:
    return any(ref.get("uid") == owner.uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def reconcile_children(api: KubeApi, spec: DeploymentSpec, owner: naming.Owner) -> Outcome:
    outcome = Outcome()
    _require_lws(api, spec)
    sm_api = spec.monitoring.service_monitor and api.serves(SERVICE_MONITOR_API, "servicemonitors")
    desired = [with_hash(m) for m in build_all(spec, owner, service_monitor_api=sm_api)]
    for manifest in desired:
        key = key_of(manifest)
        existing = api.get(key.api_version, key.kind, owner.namespace, key.name)
        if existing is None:
            api.apply(manifest)  # server-side apply creates it, owned by our field manager from the start
            outcome.created.append(_label(key))
        elif not _owned_by(existing, owner):
            raise OwnershipError(f"{_label(key)} exists and is not owned by this GLMDeployment")
        elif (existing["metadata"].get("annotations") or {}).get(naming.SPEC_HASH_ANNOTATION) == \
                manifest["metadata"]["annotations"][naming.SPEC_HASH_ANNOTATION]:
            outcome.unchanged.append(_label(key))
        else:
            api.apply(manifest)
            outcome.updated.append(_label(key))
    wanted = {key_of(m) for m in desired}
    outcome.deleted = _delete(api, owner, [k for k in possible_children(owner.name) if k not in wanted])
    return outcome


def delete_children(api: KubeApi, owner: naming.Owner) -> list[str]:
    """Delete every child (the garbage collector would too, via owner references; this does not wait for it)."""
    return _delete(api, owner, list(reversed(possible_children(owner.name))))


def _delete(api: KubeApi, owner: naming.Owner, keys: list[ChildKey]) -> list[str]:
    gone = []
    served = {v: api.serves(v, plural) for v, plural in OPTIONAL_APIS.items() if any(k.api_version == v for k in keys)}
    for key in keys:
        if not served.get(key.api_version, True):
            continue
        existing = api.get(key.api_version, key.kind, owner.namespace, key.name)
        if existing is not None and _owned_by(existing, owner):
            if api.delete(key.api_version, key.kind, owner.namespace, key.name):
                gone.append(_label(key))
    return gone


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def carried_failure(old_status: dict[str, Any] | None) -> Failure | None:
    for c in (old_status or {}).get("conditions") or []:
        if c.get("type") == "Degraded" and c.get("status") == "True" and c.get("reason") in RECONCILE_REASONS:
            return Failure(c["reason"], c.get("message", ""))
    return None


def observe(api: KubeApi, spec: DeploymentSpec | None, owner: naming.Owner, old_status: dict[str, Any] | None,
            *, failure: Failure | None, observed_generation: int) -> dict[str, Any]:
    """Read the three workloads and compute the status (spec None: unparseable, nothing could be built)."""
    deployments = {"router": api.get("apps/v1", "Deployment", owner.namespace, naming.router_name(owner.name))}
    spanning = frozenset(r.name for r in (spec.prefill, spec.decode) if r.topology.multi_node) if spec else frozenset()
    lws_served = bool(spanning) and api.serves(LWS_API, "leaderworkersets")
    for role in ("prefill", "decode"):
        if role not in spanning:
            deployments[role] = api.get("apps/v1", "Deployment", owner.namespace, naming.role_name(owner.name, role))
        else:  # counted in groups, like the replicas asked for
            deployments[role] = api.get(LWS_API, "LeaderWorkerSet", owner.namespace,
                                        naming.lws_name(owner.name, role)) if lws_served else None
    desired = {"router": spec.router.replicas if spec else 0, "prefill": spec.prefill.replicas if spec else 0,
               "decode": spec.decode.replicas if spec else 0}
    return compute_status(owner_name=owner.name, namespace=owner.namespace,
                          service_port=spec.router.service_port if spec else 80, desired=desired,
                          deployments=deployments, old_conditions=(old_status or {}).get("conditions"),
                          now=now(), observed_generation=observed_generation, failure=failure,
                          leaders_only=spanning)


def refresh_status(api: KubeApi, namespace: str, name: str) -> bool:
    """Recompute a GLMDeployment's status from its children and write it if it changed. True if written."""
    body = api.get(API_VERSION, KIND, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return False
    owner = naming.Owner.from_body(body)
    old = body.get("status") or {}
    try:
        parsed = parse_spec(body.get("spec") or {})
        check_owner_name(parsed, owner.name)
        spec: DeploymentSpec | None = parsed
    except SpecError:
        spec = None
    status = observe(api, spec, owner, old, failure=carried_failure(old),
                     observed_generation=int(old.get("observedGeneration") or 0))
    if {k: old.get(k) for k in status} == status:
        return False
    api.patch_status(namespace, name, status)
    return True
