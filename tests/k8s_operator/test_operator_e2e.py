"""The operator end to end against a Kubernetes API emulator (kmock): create, edit, scale, delete, restart,
errors; children, status, conditions and events as a user would see them through the API."""

from __future__ import annotations

import asyncio

import pytest

from glmserve.operator import handlers
from tests.k8s_operator.kube_emulator import (CORE_RESOURCES, MONITORING_RESOURCES, VersionedEmulator, declare,
                                              eventually, find, glmd, objects_of, running_operator, versions)

pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=VersionedEmulator), pytest.mark.timeout(60)]

NS = "team-a"
GLMD_RES = "glmserve.io/v1alpha1/glmdeployments"
GLMD_PATH = f"/apis/glmserve.io/v1alpha1/namespaces/{NS}/glmdeployments"
SPEC = {"model": {"name": "glm-4.7-flash", "source": {"pvc": {"claimName": "models", "path": "GLM-4.7-Flash"}}}}

CHILDREN = [("v1/serviceaccounts", "demo-router"), ("rbac.authorization.k8s.io/v1/roles", "demo-router"),
            ("rbac.authorization.k8s.io/v1/rolebindings", "demo-router"), ("v1/configmaps", "demo-engine"),
            ("v1/services", "demo"), ("v1/services", "demo-prefill"), ("v1/services", "demo-decode"),
            ("apps/v1/deployments", "demo-router"), ("apps/v1/deployments", "demo-prefill"),
            ("apps/v1/deployments", "demo-decode"), ("policy/v1/poddisruptionbudgets", "demo-router"),
            ("policy/v1/poddisruptionbudgets", "demo-prefill"), ("policy/v1/poddisruptionbudgets", "demo-decode")]


@pytest.fixture
def api(kmock):
    declare(kmock, CORE_RESOURCES)
    kmock.objects["v1/namespaces", None, NS] = {"metadata": {"name": NS}}
    return kmock


def status_of(km) -> dict:
    return (find(km, GLMD_RES, NS, "demo") or {}).get("status") or {}


def condition(km, ctype: str) -> dict:
    return next((c for c in status_of(km).get("conditions", []) if c["type"] == ctype), {})


async def create(km, spec=SPEC, **kw) -> None:
    resp = await km.post(GLMD_PATH, json=glmd("demo", NS, spec, **kw))
    assert resp.status == 200


async def edit(km, spec: dict, generation: int) -> None:
    """A spec change as the API server records it: merged in, with the generation bumped."""
    resp = await km.patch(f"{GLMD_PATH}/demo", json={"metadata": {"generation": generation}, "spec": spec})
    assert resp.status == 200


async def created_and_settled(km) -> None:
    await eventually(lambda: all(find(km, r, NS, n) for r, n in CHILDREN), what="all children")
    await eventually(lambda: status_of(km).get("observedGeneration") == 1, what="status")


async def test_create_makes_owned_children_status_and_event(api):
    async with running_operator(api):
        await create(api)
        await created_and_settled(api)
        for resource, name in CHILDREN:
            obj = find(api, resource, NS, name)
            (ref,) = obj["metadata"]["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("GLMDeployment", "demo", "uid-demo", True)
            assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "glmserve-operator"
        body = find(api, GLMD_RES, NS, "demo")
        assert "glmserve.io/cleanup" in body["metadata"]["finalizers"]
        st = status_of(api)
        assert st["endpoint"] == f"http://demo.{NS}.svc:80"
        assert (condition(api, "Ready")["status"], condition(api, "Progressing")["status"],
                condition(api, "Degraded")["status"]) == ("False", "True", "False")
        assert st["decode"]["selector"] == "app.kubernetes.io/component=decode,app.kubernetes.io/instance=demo," \
                                           "app.kubernetes.io/name=glmserve"
        reasons = {e.get("reason") for e in objects_of(api, "v1/events", NS)}
        assert "Reconciled" in reasons
        # No ServiceMonitor: the emulated cluster has no monitoring.coreos.com API.
        assert not objects_of(api, "monitoring.coreos.com/v1/servicemonitors")


async def test_status_follows_the_deployments(api):
    async with running_operator(api):
        await create(api)
        await created_and_settled(api)
        # Play the Deployment controller: every role reports its pod ready.
        for name in ("demo-router", "demo-prefill", "demo-decode"):
            resp = await api.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status", json={"status": {
                "observedGeneration": 1, "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}})
            assert resp.status == 200
        await eventually(lambda: condition(api, "Ready").get("status") == "True", what="Ready=True")
        assert condition(api, "Progressing")["status"] == "False"
        assert status_of(api)["prefill"]["readyReplicas"] == 1 == status_of(api)["decode"]["readyReplicas"]
        # A stuck rollout turns Degraded on.
        await api.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/demo-decode/status", json={"status": {
            "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                            "message": "deadline exceeded"}]}})
        await eventually(lambda: condition(api, "Degraded").get("reason") == "RolloutFailed", what="Degraded")
        assert "decode" in condition(api, "Degraded")["message"]


async def test_edit_patches_only_what_changed(api):
    async with running_operator(api):
        await create(api)
        await created_and_settled(api)
        before = {key: versions(api, *key[:1], NS, key[1]) for key in CHILDREN}
        await edit(api, {"prefill": {"engine": {"chunkedPrefillSize": 4096}}}, generation=2)
        await eventually(lambda: status_of(api).get("observedGeneration") == 2, what="generation 2")
        args = find(api, "apps/v1/deployments", NS, "demo-prefill")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--chunked-prefill-size") + 1] == "4096"
        assert "4096" in find(api, "v1/configmaps", NS, "demo-engine")["data"]["prefill.json"]
        changed = {key for key in CHILDREN if versions(api, key[0], NS, key[1]) != before[key]}
        assert changed == {("apps/v1/deployments", "demo-prefill"), ("v1/configmaps", "demo-engine")}


async def test_scaling_decode_touches_only_the_decode_deployment(api):
    async with running_operator(api):
        await create(api)
        await created_and_settled(api)
        before = {key: versions(api, key[0], NS, key[1]) for key in CHILDREN}
        await edit(api, {"decode": {"replicas": 3}}, generation=2)
        await eventually(lambda: find(api, "apps/v1/deployments", NS, "demo-decode")["spec"]["replicas"] == 3,
                         what="decode replicas 3")
        await eventually(lambda: status_of(api).get("observedGeneration") == 2, what="generation 2")
        changed = {key for key in CHILDREN if versions(api, key[0], NS, key[1]) != before[key]}
        assert changed == {("apps/v1/deployments", "demo-decode")}
        assert status_of(api)["decode"]["desiredReplicas"] == 3


async def test_optional_children_follow_their_flags(api):
    declare(api, MONITORING_RESOURCES)
    async with running_operator(api):
        await create(api)
        await created_and_settled(api)
        assert find(api, "monitoring.coreos.com/v1/servicemonitors", NS, "demo")
        await edit(api, {"decode": {"autoscaling": {"enabled": True, "maxReplicas": 6, "targetAverageValue": "8"}},
                         "monitoring": {"serviceMonitor": {"enabled": False}}}, generation=2)
        hpa = await eventually(lambda: find(api, "autoscaling/v2/horizontalpodautoscalers", NS, "demo-decode"),
                               what="HPA")
        assert hpa["spec"]["maxReplicas"] == 6
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "glmserve_num_requests_waiting"
        await eventually(lambda: not find(api, "monitoring.coreos.com/v1/servicemonitors", NS, "demo"),
                         what="ServiceMonitor deleted")
        await edit(api, {"decode": {"autoscaling": {"enabled": False}}}, generation=3)
        await eventually(lambda: not find(api, "autoscaling/v2/horizontalpodautoscalers", NS, "demo-decode"),
                         what="HPA deleted")


async def test_delete_removes_children_and_finalizer(api):
    async with running_operator(api):
        await create(api)
        await created_and_settled(api)
        resp = await api.delete(f"{GLMD_PATH}/demo")
        assert resp.status == 200
        await eventually(lambda: find(api, GLMD_RES, NS, "demo") is None, what="GLMDeployment gone")
        assert [n for r, n in CHILDREN if find(api, r, NS, n)] == []


async def test_restart_writes_nothing(api):
    async with running_operator(api):
        await create(api)
        await created_and_settled(api)
    before = {key: versions(api, key[0], NS, key[1]) for key in CHILDREN}
    glmd_before = versions(api, GLMD_RES, NS, "demo")
    seen = len(list(api))
    async with running_operator(api):
        # The resume handler reads every child (the decode HPA is the last possible one), then the Deployments
        # for the status; after that it would write, if it were going to.
        def read_after(path_end: str, start: int) -> int | None:
            return next((i for i, r in enumerate(list(api)) if i >= start and r.method == "GET"
                         and r.url.path.endswith(path_end)), None)
        hpa_read = await eventually(lambda: read_after("/horizontalpodautoscalers/demo-decode", seen),
                                    what="resume reconcile")
        await eventually(lambda: read_after("/deployments/demo-decode", hpa_read), what="status observed")
        await asyncio.sleep(0.5)
    writes = [f"{r.method} {r.url.path}" for r in list(api)[seen:] if r.method in ("POST", "PATCH", "DELETE", "PUT")]
    assert writes == []
    assert {key: versions(api, key[0], NS, key[1]) for key in CHILDREN} == before
    assert versions(api, GLMD_RES, NS, "demo") == glmd_before


async def test_errors_become_conditions_and_events_then_recover(api, monkeypatch):
    monkeypatch.setattr(handlers, "RETRY_DELAY_S", 0.5)
    # Someone else's ConfigMap holds the name the operator needs.
    api.objects["v1/configmaps", NS, "demo-engine"] = {"metadata": {"name": "demo-engine", "namespace": NS}}
    async with running_operator(api):
        await create(api)
        await eventually(lambda: condition(api, "Degraded").get("reason") == "ReconcileFailed", what="Degraded")
        assert "not owned" in condition(api, "Degraded")["message"]
        warnings = [e for e in objects_of(api, "v1/events", NS) if e.get("type") == "Warning"]
        assert warnings and warnings[0]["reason"] == "ReconcileFailed"
        resp = await api.delete(f"/api/v1/namespaces/{NS}/configmaps/demo-engine")
        assert resp.status == 200
        await eventually(lambda: condition(api, "Degraded").get("status") == "False", timeout=15, what="recovered")
        assert find(api, "v1/configmaps", NS, "demo-engine")["metadata"]["ownerReferences"][0]["uid"] == "uid-demo"


async def test_unusable_spec_is_reported_not_retried(api):
    async with running_operator(api):
        await create(api, spec={"model": {"name": "glm", "source": {}}})
        await eventually(lambda: condition(api, "Degraded").get("reason") == "InvalidSpec", what="InvalidSpec")
        assert "exactly one of pvc, hostPath, hub" in condition(api, "Degraded")["message"]
        assert not objects_of(api, "apps/v1/deployments", NS)
