"""Status and conditions from the children's state (the pure part of the status handlers)."""

from __future__ import annotations

from glmserve.operator.conditions import Failure, compute_status
from glmserve.operator.reconcile import carried_failure

DESIRED = {"router": 1, "prefill": 2, "decode": 2}


def dep(replicas=2, ready=2, updated=2, generation=1, observed=1, conditions=()):
    return {"metadata": {"generation": generation}, "spec": {"replicas": replicas},
            "status": {"replicas": replicas, "readyReplicas": ready, "updatedReplicas": updated,
                       "observedGeneration": observed, "conditions": list(conditions)}}


def status(deployments, old=None, now="2030-01-01T00:00:00Z", failure=None):
    return compute_status(owner_name="demo", namespace="ns", service_port=80, desired=DESIRED,
                          deployments=deployments, old_conditions=old, now=now, observed_generation=4,
                          failure=failure)


def cond(st, ctype):
    return next(c for c in st["conditions"] if c["type"] == ctype)


def test_all_ready():
    st = status({"router": dep(1, 1, 1), "prefill": dep(), "decode": dep()})
    assert [(c["type"], c["status"], c["reason"]) for c in st["conditions"]] == [
        ("Ready", "True", "AllReplicasReady"), ("Progressing", "False", "Complete"), ("Degraded", "False", "AsExpected")]
    assert st["observedGeneration"] == 4 and all(c["observedGeneration"] == 4 for c in st["conditions"])
    assert st["endpoint"] == "http://demo.ns.svc:80"


def test_missing_rolling_and_autoscaled():
    st = status({"router": None, "prefill": dep(), "decode": dep(ready=1, updated=1)})
    assert (cond(st, "Ready")["status"], cond(st, "Progressing")["reason"]) == ("False", "Creating")
    st = status({"router": dep(1, 1, 1), "prefill": dep(), "decode": dep(generation=2, observed=1)})
    assert cond(st, "Progressing")["reason"] == "RollingOut" and "decode" in cond(st, "Progressing")["message"]
    # An HPA scaled decode to 5: what the Deployment asks for is what counts.
    st = status({"router": dep(1, 1, 1), "prefill": dep(), "decode": dep(replicas=5, ready=5, updated=5)})
    assert st["decode"]["desiredReplicas"] == 5 and cond(st, "Ready")["status"] == "True"


def test_transition_time_moves_only_on_change():
    first = status({"router": None, "prefill": None, "decode": None}, now="2030-01-01T00:00:00Z")
    same = status({"router": dep(1, 0, 1), "prefill": None, "decode": None}, old=first["conditions"],
                  now="2030-01-01T00:05:00Z")
    assert cond(same, "Ready")["lastTransitionTime"] == "2030-01-01T00:00:00Z"
    ready = status({"router": dep(1, 1, 1), "prefill": dep(), "decode": dep()}, old=same["conditions"],
                   now="2030-01-01T00:09:00Z")
    assert cond(ready, "Ready")["lastTransitionTime"] == "2030-01-01T00:09:00Z"
    assert cond(ready, "Degraded")["lastTransitionTime"] == "2030-01-01T00:00:00Z"


def test_failures_and_stuck_rollouts_degrade():
    stuck = dep(conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                             "message": "ReplicaSet demo-decode-1 has timed out progressing."}])
    st = status({"router": dep(1, 1, 1), "prefill": dep(), "decode": stuck})
    assert (cond(st, "Degraded")["reason"], "timed out" in cond(st, "Degraded")["message"]) == ("RolloutFailed", True)
    st = status({"router": None, "prefill": None, "decode": None}, failure=Failure("ReconcileFailed", "403 Forbidden"))
    assert (cond(st, "Degraded")["status"], cond(st, "Degraded")["message"]) == ("True", "403 Forbidden")
    # A reconcile failure survives status refreshes; a rollout failure is recomputed each time.
    assert carried_failure(st) == Failure("ReconcileFailed", "403 Forbidden")
    assert carried_failure(status({"router": dep(1, 1, 1), "prefill": dep(), "decode": stuck})) is None
