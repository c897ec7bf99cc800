"""A small Kubernetes API client for the few verbs the operator uses on its children: get, server-side apply
(create or update), delete, status patch and API discovery. Built on the kubernetes package's ApiClient
(authentication, TLS), addressed by apiVersion and kind so one code path serves every child kind."""

from __future__ import annotations

import json
from typing import Any

import kubernetes.client
import urllib3

from glmserve.operator.schema import API_VERSION, KIND, PLURAL

FIELD_MANAGER = "glmserve-operator"

PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Event"): "events",
    ("apps/v1", "Deployment"): "deployments",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    ("discovery.k8s.io/v1", "EndpointSlice"): "endpointslices",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkersets",
    (API_VERSION, KIND): PLURAL,
}


class KubeError(Exception):
    """A failed API call: `status` is the HTTP status (0 when the server could not be reached)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def group_prefix(api_version: str) -> str:
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    path = f"{group_prefix(api_version)}/namespaces/{namespace}/{PLURALS[(api_version, kind)]}"
    return f"{path}/{name}" if name else path


class KubeApi:
    def __init__(self, config: kubernetes.client.Configuration, *, timeout_s: float = 30.0):
        self._client = kubernetes.client.ApiClient(config)
        self._timeout = timeout_s
        self.config = config

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, *, body: Any = None, query: list[tuple[str, str]] | None = None,
                content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, post = self._client.param_serialize(
            method, path, query_params=query or [], header_params=headers, body=body, auth_settings=["BearerToken"])
        try:
            resp = self._client.call_api(method, url, header_params=headers, body=body, post_params=post,
                                         _request_timeout=self._timeout)
            data = resp.read()
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise KubeError(0, "Unreachable", str(e)) from e
        payload = json.loads(data) if data else None
        if not 200 <= resp.status < 300:
            info = payload if isinstance(payload, dict) else {}
            raise KubeError(resp.status, info.get("reason") or resp.reason or "Error",
                            info.get("message") or (data or b"").decode(errors="replace")[:500])
        return payload

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", object_path(api_version, kind, namespace, name))
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply, which also creates a missing object. Fields the operator stops setting are removed,
        fields others own (an HPA's replica count, a webhook's additions) are left alone. force: the operator is
        the authority on its children."""
        meta = manifest["metadata"]
        return self.request("PATCH", object_path(manifest["apiVersion"], manifest["kind"], meta["namespace"],
                                                 meta["name"]),
                            body=manifest, content_type="application/apply-patch+yaml",
                            query=[("fieldManager", FIELD_MANAGER), ("force", "true")])

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """True when something was deleted; a missing object (or an API the cluster lacks) is not an error."""
        try:
            self.request("DELETE", object_path(api_version, kind, namespace, name),
                         body={"propagationPolicy": "Background"})
            return True
        except KubeError as e:
            if e.status == 404:
                return False
            raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        path = object_path(API_VERSION, KIND, namespace, name) + "/status"
        return self.request("PATCH", path, body={"status": status}, content_type="application/merge-patch+json")

    def serves(self, api_version: str, plural: str) -> bool:
        """Whether the cluster serves this resource (e.g. whether the ServiceMonitor CRD is installed)."""
        try:
            listing = self.request("GET", group_prefix(api_version))
        except KubeError as e:
            if e.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in (listing or {}).get("resources", []))


def load_config() -> kubernetes.client.Configuration:
    """Credentials as a pod (service account) or, outside a cluster, as kubectl (kubeconfig) has them."""
    import kubernetes.config

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.Configuration.get_default_copy()
