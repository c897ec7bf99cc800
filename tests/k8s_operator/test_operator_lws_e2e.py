"""The operator end to end (kmock) with a role spanning nodes: it creates a LeaderWorkerSet instead of that
role's Deployment, follows the groups' status, switches layouts when the tensor-parallel size changes, and says
clearly what is missing when the cluster has no LeaderWorkerSet API."""

from __future__ import annotations

import pytest

from tests.k8s_operator.kube_emulator import (CORE_RESOURCES, VersionedEmulator, declare, eventually, find,
                                              glmd, objects_of, running_operator)

pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=VersionedEmulator), pytest.mark.timeout(60)]

NS = "team-a"
GLMD_RES = "glmserve.io/v1alpha1/glmdeployments"
GLMD_PATH = f"/apis/glmserve.io/v1alpha1/namespaces/{NS}/glmdeployments"
LWS_RES = "leaderworkerset.x-k8s.io/v1/leaderworkersets"
LWS_RESOURCES = {LWS_RES: ("LeaderWorkerSet", True, {"status", "scale"})}
SPEC = {"model": {"name": "glm-4.7", "source": {"pvc": {"claimName": "models", "path": "GLM-4.7"}}},
        "decode": {"replicas": 2, "tensorParallelSize": 16, "gpus": 16}}


def status_of(km) -> dict:
    return (find(km, GLMD_RES, NS, "demo") or {}).get("status") or {}


def condition(km, ctype: str) -> dict:
    return next((c for c in status_of(km).get("conditions", []) if c["type"] == ctype), {})


def _namespace(km) -> None:
    km.objects["v1/namespaces", None, NS] = {"metadata": {"name": NS}}


async def test_multi_node_role_becomes_a_leaderworkerset(kmock):
    declare(kmock, {**CORE_RESOURCES, **LWS_RESOURCES})
    _namespace(kmock)
    async with running_operator(kmock):
        assert (await kmock.post(GLMD_PATH, json=glmd("demo", NS, SPEC))).status == 200
        lws = await eventually(lambda: find(kmock, LWS_RES, NS, "demo-decode-lws"), what="LeaderWorkerSet")
        assert lws["metadata"]["ownerReferences"][0]["name"] == "demo"
        assert lws["spec"]["replicas"] == 2 and lws["spec"]["leaderWorkerTemplate"]["size"] == 2
        await eventually(lambda: find(kmock, "apps/v1/deployments", NS, "demo-prefill"), what="prefill Deployment")
        assert find(kmock, "apps/v1/deployments", NS, "demo-decode") is None
        svc = find(kmock, "v1/services", NS, "demo-decode")
        assert svc["spec"]["selector"]["glmserve.io/group-rank"] == "leader"
        await eventually(lambda: status_of(kmock).get("observedGeneration") == 1, what="status")
        assert "glmserve.io/group-rank=leader" in status_of(kmock)["decode"]["selector"]

        # LWS reports both groups ready (and, being settled, Progressing=False: that is not a stuck rollout).
        resp = await kmock.patch(f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{NS}/leaderworkersets/"
                                 "demo-decode-lws/status", json={"status": {
                                     "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2,
                                     "conditions": [{"type": "Available", "status": "True"},
                                                    {"type": "Progressing", "status": "False"}]}})
        assert resp.status == 200
        await eventually(lambda: status_of(kmock)["decode"]["readyReplicas"] == 2, what="groups ready")
        assert condition(kmock, "Degraded")["status"] == "False"

        # TP 16 -> 8: the worker fits one node again; the LeaderWorkerSet gives way to a Deployment.
        await kmock.patch(f"{GLMD_PATH}/demo", json={"metadata": {"generation": 2},
                                                     "spec": {"decode": {"tensorParallelSize": 8, "gpus": 8}}})
        await eventually(lambda: find(kmock, "apps/v1/deployments", NS, "demo-decode"), what="decode Deployment")
        await eventually(lambda: find(kmock, LWS_RES, NS, "demo-decode-lws") is None, what="LWS deleted")
        # The Service's last apply selects every decode pod again (kmock merges applies, where server-side apply
        # would drop the field the operator no longer sets, so look at what was sent).
        applied = [r.data for r in list(kmock) if r.method == "PATCH" and r.url.path.endswith("/services/demo-decode")]
        assert applied[0]["spec"]["selector"]["glmserve.io/group-rank"] == "leader"
        assert "glmserve.io/group-rank" not in applied[-1]["spec"]["selector"]


async def test_missing_leaderworkerset_api_is_reported(kmock):
    declare(kmock, CORE_RESOURCES)  # no leaderworkerset.x-k8s.io in this cluster
    _namespace(kmock)
    async with running_operator(kmock):
        assert (await kmock.post(GLMD_PATH, json=glmd("demo", NS, SPEC))).status == 200
        await eventually(lambda: condition(kmock, "Degraded").get("reason") == "ReconcileFailed", what="Degraded")
        message = condition(kmock, "Degraded")["message"]
        assert "decode spans 2 nodes (tensorParallelSize 16, gpusPerNode 8)" in message
        assert "LeaderWorkerSet API (leaderworkerset.x-k8s.io/v1)" in message and "install LWS" in message
        assert not objects_of(kmock, "apps/v1/deployments", NS)  # nothing half-built
        warnings = [e for e in objects_of(kmock, "v1/events", NS) if e.get("type") == "Warning"]
        assert warnings and "LeaderWorkerSet API" in warnings[0]["message"]
