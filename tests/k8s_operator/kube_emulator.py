"""kmock set up as a small Kubernetes API for the operator and discovery tests.

kmock stores and streams objects but does not version them, garbage-collect, validate or default. Two of
those matter to kopf and are filled in here: every write gets a new metadata.resourceVersion (kopf waits for
the version its own patch produced before it trusts an event; a stale optimistic-lock patch gets 409 Conflict,
not kmock's 500), and each test declares the resources it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp.web
import kmock
import kopf
import kubernetes.client
from typing_extensions import override

from kmock._internal import enums, rendering

ALL_VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}

# (group/version/plural) -> (kind, namespaced, subresources)
CORE_RESOURCES = {
    "glmserve.io/v1alpha1/glmdeployments": ("GLMDeployment", True, {"status", "scale"}),
    "v1/namespaces": ("Namespace", False, set()),
    "v1/events": ("Event", True, set()),
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/services": ("Service", True, set()),
    "v1/serviceaccounts": ("ServiceAccount", True, set()),
    "apps/v1/deployments": ("Deployment", True, {"status", "scale"}),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True, {"status"}),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", True, {"status"}),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True, set()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True, set()),
    "discovery.k8s.io/v1/endpointslices": ("EndpointSlice", True, set()),
}
MONITORING_RESOURCES = {"monitoring.coreos.com/v1/servicemonitors": ("ServiceMonitor", True, set())}


class VersionedEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator with resource versions as the API server keeps them (every write stamps a new one,
    a list reports the latest, a watch from a version skips what the client has already seen), and with
    server-side apply creating an object that does not exist yet."""

    _counter = itertools.count(1000)
    _latest = 1000

    def _next_version(self) -> str:
        VersionedEmulator._latest = next(self._counter)
        return str(self._latest)

    @override
    async def _handle(self, request: rendering.Request):  # type: ignore[override]
        if request.resource is not None and request.action == enums.action.UPDATE and \
                "apply-patch" in request.headers.get("Content-Type", ""):
            key = (request.resource, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:  # server-side apply creates what is missing
                return await self._apply_create(key, request)
        if request.resource is not None and request.action in (enums.action.CREATE, enums.action.UPDATE):
            version = self._next_version()
            if isinstance(request.data, list):  # JSON patch: kopf tests the old version first, then we bump it
                self._check_version(request)
                request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            elif isinstance(request.data, dict):
                request.data.setdefault("metadata", {})["resourceVersion"] = version
        elif request.resource is not None and request.action == enums.action.DELETE and request.name:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                self.objects[key].patch({"metadata": {"resourceVersion": self._next_version()}})
        return await super()._handle(request)

    @override
    async def _serve_list(self, request: rendering.Request):  # type: ignore[override]
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = str(self._latest)
        return result

    @override
    async def _serve_watch(self, request: rendering.Request):  # type: ignore[override]
        since = request.params.get("resourceVersion", "")
        async for event in super()._serve_watch(request):
            if since.isdigit() and isinstance(event, dict) and event.get("type") != "DELETED":
                seen = str((event.get("object", {}).get("metadata") or {}).get("resourceVersion", ""))
                if seen.isdigit() and int(seen) <= int(since):
                    continue
            yield event

    async def _apply_create(self, key: tuple[Any, str | None, str], request: rendering.Request):
        obj = dict(request.data)
        obj["metadata"] = {**obj.get("metadata", {}), "resourceVersion": self._next_version()}
        async with self._lock:
            if key in self.objects:
                self.objects[key].create(obj)
            else:
                self.objects[key] = obj
            await self._buses[request.resource].put({"type": "ADDED", "object": obj})
        return aiohttp.web.json_response(obj, status=201)

    def _check_version(self, request: rendering.Request) -> None:
        expected = [op["value"] for op in request.data if op.get("op") == "test"
                    and op.get("path") == "/metadata/resourceVersion"]
        key = (request.resource, request.namespace, request.name)
        if expected and key in self.objects and not self.objects[key].deleted:
            current = (self.objects[key].raw.get("metadata") or {}).get("resourceVersion")
            if current != expected[0]:
                raise kmock.KubernetesError(status=409, reason="Conflict",
                                            message="the object has been modified; please apply your changes "
                                                    "to the latest version and try again")


def declare(km: kmock.KubernetesEmulator, resources: dict[str, tuple[str, bool, set[str]]]) -> None:
    for key, (kind, namespaced, subresources) in resources.items():
        km.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, subresources=subresources,
                                               verbs=ALL_VERBS)


def client_config(km: kmock.KubernetesEmulator) -> kubernetes.client.Configuration:
    cfg = kubernetes.client.Configuration()
    cfg.host = str(km.url).rstrip("/")
    return cfg


@contextlib.asynccontextmanager
async def running_operator(km: kmock.KubernetesEmulator) -> AsyncIterator[None]:
    """Run the operator (all namespaces) against the emulator, in its own thread and event loop (kopf waits
    for every task of its loop at exit, and the emulator's endless watch streams would be among them)."""
    import glmserve.operator.handlers  # noqa: F401  (registers the handlers)

    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(kopf.operator(clusterwide=True, standalone=True, memo=kopf.Memo(kube_config=client_config(km)),
                                      stop_flag=stop, ready_flag=ready))
        except BaseException as e:  # surfaced to the test below
            errors.append(e)

    thread = threading.Thread(target=main, name="operator", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 10), f"operator did not start: {errors}"
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive(), "operator did not stop"
    assert not errors, errors


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll until predicate() is truthy (returns its value)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (KeyError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def glmd(name: str, namespace: str, spec: dict[str, Any], *, uid: str = "uid-demo", generation: int = 1) -> dict[str, Any]:
    return {"apiVersion": "glmserve.io/v1alpha1", "kind": "GLMDeployment",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": generation,
                         "resourceVersion": "1"},
            "spec": spec}


def _resource_key(resource: Any) -> str:
    return "/".join(p for p in (resource.group, resource.version, resource.plural) if p)


def find(km: kmock.KubernetesEmulator, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    """The stored object (raw dict) or None when absent or deleted. resource: "apps/v1/deployments"."""
    for (res, ns, nm), obj in km.objects.items():
        if _resource_key(res) == resource and ns == namespace and nm == name and not obj.deleted:
            return obj.raw
    return None


def versions(km: kmock.KubernetesEmulator, resource: str, namespace: str | None, name: str) -> int:
    """How many times the object was written (its history length; 0 when never created)."""
    for (res, ns, nm), obj in km.objects.items():
        if _resource_key(res) == resource and ns == namespace and nm == name:
            return len(obj.history)
    return 0


def objects_of(km: kmock.KubernetesEmulator, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
    return [obj.raw for (res, ns, _), obj in km.objects.items()
            if _resource_key(res) == resource and (namespace is None or ns == namespace) and not obj.deleted]
