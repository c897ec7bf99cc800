"""GLMDeployment status from the state of its Deployments: a pure function, so the handlers only fetch and write.

Conditions follow the Kubernetes conventions: Ready, Progressing and Degraded, each True/False with a reason and
a message; lastTransitionTime only moves when the status of that condition changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glmserve.operator import naming

ROLES = ("router", "prefill", "decode")


@dataclass(frozen=True)
class Failure:
    """Why the last reconcile failed (becomes the Degraded condition)."""

    reason: str
    message: str


def role_status(owner_name: str, component: str, deployment: dict[str, Any] | None,
                desired: int, *, leaders_only: bool = False) -> dict[str, Any]:
    """deployment: the role's Deployment, or its LeaderWorkerSet (same status fields, counted in groups);
    leaders_only: the role's groups span nodes, and only their leaders serve (and export metrics)."""
    sel = naming.selector_labels(owner_name, component)
    if leaders_only:
        sel = {**sel, **naming.GROUP_LEADER_LABEL}
    out = {"desiredReplicas": desired, "replicas": 0, "readyReplicas": 0, "updatedReplicas": 0,
           "selector": ",".join(f"{k}={v}" for k, v in sorted(sel.items()))}
    if deployment is not None:
        st = deployment.get("status") or {}
        # An autoscaler may have changed the replica count: the Deployment's own spec is what is asked for now.
        out["desiredReplicas"] = (deployment.get("spec") or {}).get("replicas", desired)
        out.update({k: int(st.get(k) or 0) for k in ("replicas", "readyReplicas", "updatedReplicas")})
    return out


def _rollout_stuck(deployment: dict[str, Any] | None) -> str | None:
    if (deployment or {}).get("kind") == "LeaderWorkerSet":
        return None  # no progress deadline there, and its Progressing=False means settled, not stuck
    for c in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("status") == "False":
            return c.get("message") or c.get("reason") or "rollout stalled"
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            return c.get("message") or "pods cannot be created"
    return None


def _stale(deployment: dict[str, Any] | None) -> bool:
    if deployment is None:
        return True
    observed = (deployment.get("status") or {}).get("observedGeneration")
    generation = (deployment.get("metadata") or {}).get("generation")
    return observed is not None and generation is not None and observed < generation


def compute_status(*, owner_name: str, namespace: str, service_port: int, desired: dict[str, int],
                   deployments: dict[str, dict[str, Any] | None], old_conditions: list[dict[str, Any]] | None,
                   now: str, observed_generation: int, failure: Failure | None = None,
                   leaders_only: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The whole `.status` of a GLMDeployment.

    desired: replicas asked for per role (router, prefill, decode); deployments: the Deployment (or
    LeaderWorkerSet) per role as read from the API (None when missing); now: RFC 3339 timestamp for changed
    conditions; leaders_only: the roles whose groups span nodes.
    """
    roles = {r: role_status(owner_name, r, deployments.get(r), desired[r], leaders_only=r in leaders_only)
             for r in ROLES}
    summary = ", ".join(f"{r} {s['readyReplicas']}/{s['desiredReplicas']} ready" for r, s in roles.items())

    not_ready = [r for r, s in roles.items() if s["desiredReplicas"] < 1 or s["readyReplicas"] < s["desiredReplicas"]]
    ready = ("False", "ReplicasNotReady", summary) if not_ready else ("True", "AllReplicasReady", summary)

    missing = [r for r in ROLES if deployments.get(r) is None]
    moving = [r for r, s in roles.items() if _stale(deployments.get(r)) or s["updatedReplicas"] < s["desiredReplicas"]
              or s["replicas"] != s["desiredReplicas"] or s["readyReplicas"] < s["desiredReplicas"]]
    if missing:
        progressing = ("True", "Creating", f"waiting for the {', '.join(missing)} Deployment(s)")
    elif moving:
        progressing = ("True", "RollingOut", f"{', '.join(moving)} rolling out or scaling: {summary}")
    else:
        progressing = ("False", "Complete", "every role runs the current spec")

    stuck = {r: m for r in ROLES if (m := _rollout_stuck(deployments.get(r)))}
    if failure is not None:
        degraded = ("True", failure.reason, failure.message)
    elif stuck:
        degraded = ("True", "RolloutFailed", "; ".join(f"{r}: {m}" for r, m in stuck.items()))
    else:
        degraded = ("False", "AsExpected", "no failures")

    old = {c["type"]: c for c in old_conditions or []}
    conditions = []
    for ctype, (status, reason, message) in (("Ready", ready), ("Progressing", progressing), ("Degraded", degraded)):
        prev = old.get(ctype)
        since = prev["lastTransitionTime"] if prev and prev.get("status") == status and prev.get(
            "lastTransitionTime") else now
        conditions.append({"type": ctype, "status": status, "reason": reason, "message": message,
                           "lastTransitionTime": since, "observedGeneration": observed_generation})
    return {
        "observedGeneration": observed_generation,
        "endpoint": f"http://{naming.router_service_name(owner_name)}.{namespace}.svc:{service_port}",
        **roles,
        "conditions": conditions,
    }
