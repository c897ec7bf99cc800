"""KubernetesDiscovery: ready endpoints of the prefill/decode headless Services, followed through EndpointSlice
changes (scale up, scale down, draining pods) served by a Kubernetes API emulator."""

from __future__ import annotations

import kubernetes.client
import pytest

from glmserve.router.discovery import WorkerSet
from glmserve.router.discovery_k8s import KubernetesDiscovery, ready_addresses
from tests.k8s_operator.kube_emulator import (CORE_RESOURCES, VersionedEmulator, client_config, declare,
                                              eventually)

NS = "team-a"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"


def endpoint(ip: str, ready: bool | None = True, terminating: bool = False) -> dict:
    cond = {"terminating": terminating}
    if ready is not None:
        cond["ready"] = ready
    return {"addresses": [ip], "conditions": cond}


def slice_obj(name: str, service: str, grpc_port: int, endpoints: list[dict], address_type: str = "IPv4") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
            "addressType": address_type,
            "ports": [{"name": "http", "port": 8101, "protocol": "TCP"},
                      {"name": "grpc", "port": grpc_port, "protocol": "TCP"}],
            "endpoints": endpoints}


def test_ready_addresses_keeps_only_ready_serving_endpoints():
    s = slice_obj("x", "svc", 50061, [endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False),
                                      endpoint("10.0.0.3", ready=None), endpoint("10.0.0.4", terminating=True)])
    assert ready_addresses(s, "grpc") == ["10.0.0.1:50061", "10.0.0.3:50061"]
    assert ready_addresses(s, "kv") == []  # no such port: nothing usable
    v6 = slice_obj("y", "svc", 50071, [endpoint("fd00::5")], address_type="IPv6")
    assert ready_addresses(v6, "grpc") == ["[fd00::5]:50071"]


@pytest.mark.asyncio
@pytest.mark.kmock(cls=VersionedEmulator)
@pytest.mark.timeout(60)
async def test_follows_scale_up_scale_down_and_draining(kmock):
    declare(kmock, CORE_RESOURCES)
    # Before the router starts: one prefill pod, and a slice of an unrelated Service that must be ignored.
    for body in (slice_obj("demo-prefill-a", "demo-prefill", 50061, [endpoint("10.0.1.1")]),
                 slice_obj("other-x", "unrelated", 50061, [endpoint("10.9.9.9")])):
        assert (await kmock.post(SLICES, json=body)).status == 200

    api_client = kubernetes.client.ApiClient(client_config(kmock))
    disc = KubernetesDiscovery(NS, "demo-prefill", "demo-decode", api_client=api_client, watch_timeout_s=1.0,
                               retry_delay_s=0.1)
    await disc.start()
    try:
        assert disc.current() == WorkerSet(prefill=("10.0.1.1:50061",), decode=())

        # Decode scales up from 0 to 2 (one not ready yet).
        await kmock.post(SLICES, json=slice_obj("demo-decode-a", "demo-decode", 50071,
                                                [endpoint("10.0.2.1"), endpoint("10.0.2.2", ready=False)]))
        await eventually(lambda: disc.current().decode == ("10.0.2.1:50071",), what="decode scale-up")
        await kmock.patch(f"{SLICES}/demo-decode-a", json={"endpoints": [endpoint("10.0.2.1"), endpoint("10.0.2.2")]})
        await eventually(lambda: disc.current().decode == ("10.0.2.1:50071", "10.0.2.2:50071"), what="pod ready")

        # Prefill grows into a second slice; then a decode pod drains (terminating) and goes away.
        await kmock.post(SLICES, json=slice_obj("demo-prefill-b", "demo-prefill", 50061, [endpoint("10.0.1.2")]))
        await eventually(lambda: disc.current().prefill == ("10.0.1.1:50061", "10.0.1.2:50061"), what="2nd slice")
        await kmock.patch(f"{SLICES}/demo-decode-a", json={"endpoints": [
            endpoint("10.0.2.1"), endpoint("10.0.2.2", ready=False, terminating=True)]})
        await eventually(lambda: disc.current().decode == ("10.0.2.1:50071",), what="draining pod dropped")

        # Scale prefill down: its first slice disappears.
        assert (await kmock.delete(f"{SLICES}/demo-prefill-a")).status == 200
        await eventually(lambda: disc.current().prefill == ("10.0.1.2:50061",), what="prefill scale-down")
        assert "10.9.9.9" not in str(disc.current())

        # The watch is re-established after its timeout (a fresh list) and keeps following changes.
        await eventually(lambda: sum(1 for r in list(kmock) if r.method == "GET" and "watch" not in r.url.query
                                     and r.url.path == SLICES) >= 2, timeout=15, what="relist")
        await kmock.patch(f"{SLICES}/demo-prefill-b", json={"endpoints": [endpoint("10.0.1.2"), endpoint("10.0.1.3")]})
        await eventually(lambda: disc.current().prefill == ("10.0.1.2:50061", "10.0.1.3:50061"), what="after relist")
    finally:
        await disc.stop()
        api_client.close()
    assert not disc._thread.is_alive()
