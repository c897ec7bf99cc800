"""Worker discovery from Kubernetes: the ready endpoints of the prefill and decode headless Services.

The router lists and then watches the EndpointSlices of both Services (label `kubernetes.io/service-name`) and
keeps, per role, the `ip:port` of every endpoint that is ready and not terminating, with the port named `grpc`.
Scale-ups, scale-downs and draining pods show up as EndpointSlice changes, so no restart is needed.

The kubernetes client is synchronous: one daemon thread runs the list+watch loop, and `current()` only reads a
snapshot under a lock, so it stays cheap for the router's health tick.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

import kubernetes.client
import kubernetes.config
import kubernetes.watch

from glmserve.router.discovery import WorkerDiscovery, WorkerSet

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def ready_addresses(slice_obj: dict[str, Any], port_name: str) -> list[str]:
    """`host:port` of each ready, non-terminating endpoint of one EndpointSlice (raw dict)."""
    port = next((p.get("port") for p in slice_obj.get("ports") or [] if p.get("name") == port_name), None)
    if port is None:
        return []
    host_fmt = "[{}]:{}" if slice_obj.get("addressType") == "IPv6" else "{}:{}"
    out = []
    for ep in slice_obj.get("endpoints") or []:
        cond = ep.get("conditions") or {}
        # An absent `ready` means unknown, which the API says to treat as ready; terminating pods are draining.
        if cond.get("ready") is False or cond.get("terminating") is True:
            continue
        out.extend(host_fmt.format(addr, port) for addr in ep.get("addresses") or [])
    return out


class KubernetesDiscovery(WorkerDiscovery):
    def __init__(self, namespace: str, prefill_service: str, decode_service: str, *,
                 api_client: kubernetes.client.ApiClient | None = None, port_name: str = "grpc",
                 watch_timeout_s: float = 60.0, retry_delay_s: float = 1.0):
        """api_client: None uses the pod's service account (the router runs in the cluster).
        watch_timeout_s: each watch is re-established (after a fresh list) at least this often."""
        self._namespace = namespace
        self._services = {prefill_service: "prefill", decode_service: "decode"}
        self._api_client = api_client
        self._port_name = port_name
        self._watch_timeout_s = watch_timeout_s
        self._retry_delay_s = retry_delay_s
        self._lock = threading.Lock()
        self._slices: dict[str, tuple[str, tuple[str, ...]]] = {}  # slice name -> (role, addresses)
        self._set = WorkerSet()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: kubernetes.watch.Watch | None = None
        self._version: str | None = None

    # -- WorkerDiscovery ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._api_client is None:
            kubernetes.config.load_incluster_config()
            self._api_client = kubernetes.client.ApiClient()
        self._api = kubernetes.client.DiscoveryV1Api(self._api_client)
        # List once before returning, so the router starts with the workers that already exist.
        self._version = await asyncio.to_thread(self._relist)
        self._thread = threading.Thread(target=self._run, name="k8s-discovery", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self._watch_timeout_s * 1.5 + 5)

    def current(self) -> WorkerSet:
        with self._lock:
            return self._set

    # -- internals ------------------------------------------------------------------------------------
    def _selector(self) -> str:
        return f"{SERVICE_NAME_LABEL} in ({','.join(sorted(self._services))})"

    def _role_of(self, obj: dict[str, Any]) -> str | None:
        return self._services.get((obj.get("metadata", {}).get("labels") or {}).get(SERVICE_NAME_LABEL, ""))

    def _publish(self) -> None:
        by_role: dict[str, list[str]] = {"prefill": [], "decode": []}
        for role, addrs in self._slices.values():
            by_role[role].extend(addrs)
        # Sorted and de-duplicated: one pod can appear in two slices while the controller moves it.
        new = WorkerSet(tuple(sorted(set(by_role["prefill"]))), tuple(sorted(set(by_role["decode"]))))
        if new != self._set:
            log.info("workers now: prefill %s, decode %s", new.prefill, new.decode)
        self._set = new

    def _relist(self) -> str | None:
        resp = self._api.list_namespaced_endpoint_slice(self._namespace, label_selector=self._selector(),
                                                       _preload_content=False,
                                                       _request_timeout=self._watch_timeout_s)
        body = json.loads(resp.data)
        if not 200 <= resp.status < 300:
            raise kubernetes.client.ApiException(status=resp.status, reason=body.get("message", "list failed"))
        slices = {}
        for item in body.get("items") or []:
            role = self._role_of(item)
            if role is not None:
                slices[item["metadata"]["name"]] = (role, tuple(ready_addresses(item, self._port_name)))
        with self._lock:
            self._slices = slices
            self._publish()
        return (body.get("metadata") or {}).get("resourceVersion")

    def _apply_event(self, event: dict[str, Any]) -> None:
        obj = event.get("object") or {}
        role = self._role_of(obj)
        name = (obj.get("metadata") or {}).get("name")
        if role is None or name is None:
            return
        with self._lock:
            if event.get("type") == "DELETED":
                self._slices.pop(name, None)
            elif event.get("type") in ("ADDED", "MODIFIED"):
                self._slices[name] = (role, tuple(ready_addresses(obj, self._port_name)))
            self._publish()

    def _run(self) -> None:
        version = self._version
        while not self._stop.is_set():
            try:
                # A fresh list before every later watch: nothing is missed across reconnects or expired versions.
                if version is None:
                    version = self._relist()
                self._watch = kubernetes.watch.Watch()
                kwargs: dict[str, Any] = {"label_selector": self._selector(),
                                          "timeout_seconds": max(1, int(self._watch_timeout_s)),
                                          "_request_timeout": self._watch_timeout_s * 1.5 + 1, "deserialize": False}
                if version:
                    kwargs["resource_version"] = version
                version = None
                for event in self._watch.stream(self._api.list_namespaced_endpoint_slice, self._namespace, **kwargs):
                    if self._stop.is_set():
                        break
                    self._apply_event(event)
            except Exception as e:  # the API server restarted, the watch expired, the network hiccuped: retry
                if self._stop.is_set():
                    break
                log.warning("EndpointSlice watch failed (%s); retrying", e)
                self._stop.wait(self._retry_delay_s)
