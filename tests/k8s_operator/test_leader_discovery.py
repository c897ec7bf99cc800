"""The router finds the leaders of groups spanning nodes, and only them: the pods LWS would create from the
operator's LeaderWorkerSets, the EndpointSlices Kubernetes would derive from the operator's Services, and the
router's own discovery (KubernetesDiscovery, started with the operator's router args) against a Kubernetes API
emulator."""

from __future__ import annotations

from typing import Any

import kubernetes.client
import pytest

from glmserve.operator import naming
from glmserve.operator.manifests import build_all
from glmserve.operator.spec import parse_spec
from glmserve.router.discovery_k8s import KubernetesDiscovery
from tests.k8s_operator.kube_emulator import CORE_RESOURCES, VersionedEmulator, client_config, declare, eventually
from tests.k8s_operator.lws_pods import Pod, pods_of
from tests.k8s_operator.samples import GLM47_TWO_NODES

NS = "team-a"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
OWNER = naming.Owner("demo", NS, "uid")
cli = pytest.importorskip("glmserve.cli")


def endpoint_slice(service: dict[str, Any], pods: list[Pod], ready: set[str]) -> dict[str, Any]:
    """What the EndpointSlice controller publishes for a Service: every pod its selector matches, each service
    port resolved to the pod's container port of that name."""
    selector = service["spec"]["selector"]
    chosen = [p for p in pods if selector.items() <= p.labels.items()]
    ports = []
    for sp in service["spec"]["ports"]:
        numbers = {cp["containerPort"] for p in chosen for cp in p.container["ports"] if cp["name"] == sp["targetPort"]}
        assert len(numbers) <= 1
        if numbers:
            ports.append({"name": sp["name"], "port": numbers.pop(), "protocol": "TCP"})
    name = service["metadata"]["name"]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{name}-abcde", "namespace": NS, "labels": {"kubernetes.io/service-name": name}},
            "ports": ports,
            "endpoints": [{"addresses": [p.ip], "conditions": {"ready": p.name in ready}, "targetRef": {
                "kind": "Pod", "name": p.name, "namespace": NS}} for p in chosen]}


@pytest.mark.asyncio
@pytest.mark.kmock(cls=VersionedEmulator)
@pytest.mark.timeout(60)
async def test_router_discovers_group_leaders_only(kmock):
    declare(kmock, CORE_RESOURCES)
    ms = {(m["kind"], m["metadata"]["name"]): m for m in build_all(parse_spec(GLM47_TWO_NODES), OWNER,
                                                                     service_monitor_api=False)}
    router_args = ms[("Deployment", "demo-router")]["spec"]["template"]["spec"]["containers"][0]["args"]
    pods = {role: pods_of(ms[("LeaderWorkerSet", f"demo-{role}-lws")], replicas=2) for role in ("prefill", "decode")}
    every_pod = {p.name for ps in pods.values() for p in ps}  # all running and ready: only the selector decides
    for role in ("prefill", "decode"):
        body = endpoint_slice(ms[("Service", f"demo-{role}")], pods[role], ready=every_pod)
        assert (await kmock.post(SLICES, json=body)).status == 200

    a = cli.build_parser().parse_args(router_args)  # the router's own parser reads the operator's args
    disc = KubernetesDiscovery(a.namespace, a.prefill_service, a.decode_service, port_name=a.grpc_port_name,
                               api_client=kubernetes.client.ApiClient(client_config(kmock)), watch_timeout_s=1.0,
                               retry_delay_s=0.1)
    await disc.start()
    try:
        found = disc.current()
        leaders = {role: sorted(f"{p.ip}:{naming.GRPC_PORT[role]}" for p in ps if p.index == 0)
                   for role, ps in pods.items()}
        assert (list(found.prefill), list(found.decode)) == (leaders["prefill"], leaders["decode"])
        assert len(found.decode) == 2  # one address per group, not per pod

        # A leader that is not ready (its group still loading) drops out; the workers never come in its place.
        leader0 = next(p for p in pods["decode"] if p.name == "demo-decode-lws-0")
        body = endpoint_slice(ms[("Service", "demo-decode")], pods["decode"], ready=every_pod - {leader0.name})
        await kmock.patch(f"{SLICES}/demo-decode-abcde", json={"endpoints": body["endpoints"]})
        await eventually(lambda: list(disc.current().decode) == [a for a in leaders["decode"]
                                                                 if not a.startswith(f"{leader0.ip}:")],
                         what="unready leader dropped")
    finally:
        await disc.stop()


def test_a_role_wide_selector_would_expose_the_workers():
    """The control: with the one-node selector the Service would hand the router the non-leader ranks too."""
    ms = {(m["kind"], m["metadata"]["name"]): m for m in build_all(parse_spec(GLM47_TWO_NODES), OWNER,
                                                                     service_monitor_api=False)}
    svc = ms[("Service", "demo-decode")]
    pods = pods_of(ms[("LeaderWorkerSet", "demo-decode-lws")])
    everyone = {p.name for p in pods}
    role_wide = {**svc, "spec": {**svc["spec"], "selector": naming.selector_labels("demo", "decode")}}
    assert len(endpoint_slice(role_wide, pods, everyone)["endpoints"]) == len(pods) == 4
    assert len(endpoint_slice(svc, pods, everyone)["endpoints"]) == 2
