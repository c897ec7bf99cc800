"""Workers across GPUs and nodes: a role that fits on one node is a Deployment whose pod holds all its GPUs; a
role whose tensor-parallel group spans nodes is a LeaderWorkerSet, validated against LWS's own CRD schema (and
its pod templates against Kubernetes' PodTemplate schema), whose pods find their leader and rank."""

from __future__ import annotations

import kubernetes_validate
import pytest

from glmserve.operator import naming
from glmserve.operator.manifests import build_all, key_of, possible_children
from glmserve.operator.spec import parse_spec
from tests.k8s_operator import lws_schema
from tests.k8s_operator.lws_pods import pods_of
from tests.k8s_operator.samples import GLM47_ONE_NODE, GLM47_TWO_NODES, MIXED_FOUR_NODES, MULTI_NODE_SPECS

OWNER = naming.Owner("demo", "team-a", "0d6c1a52-uid", generation=2)
K8S_VERSIONS = ("1.29", "1.35")


def build(spec: dict) -> dict[tuple[str, str], dict]:
    return {(m["kind"], m["metadata"]["name"]): m for m in build_all(parse_spec(spec), OWNER, service_monitor_api=False)}


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def pod_template_object(template: dict, name: str) -> dict:
    """An embedded pod template as a core/v1 PodTemplate, so Kubernetes' own schema checks it strictly."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name, "namespace": "team-a"},
            "template": template}


def test_one_node_worker_holds_all_its_gpus_in_one_pod():
    ms = build(GLM47_ONE_NODE)
    assert not any(kind == "LeaderWorkerSet" for kind, _ in ms)
    for role in ("prefill", "decode"):
        pod = ms[("Deployment", f"demo-{role}")]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert flag(c["args"], "--tensor-parallel-size") == "8" and "--enable-expert-parallel" in c["args"]
        assert not {"--nnodes", "--node-rank", "--dist-init-addr"} & set(c["args"])  # one node: no rendezvous flags
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        svc = ms[("Service", f"demo-{role}")]
        assert svc["spec"]["selector"] == naming.selector_labels("demo", role)  # every pod is a whole worker


@pytest.mark.parametrize("spec_name", sorted(MULTI_NODE_SPECS))
def test_every_multi_node_manifest_validates(spec_name):
    manifests = build_all(parse_spec(MULTI_NODE_SPECS[spec_name]), OWNER, service_monitor_api=False)
    assert len({key_of(m) for m in manifests}) == len(manifests)
    possible = set(possible_children(OWNER.name))
    kinds = [m["kind"] for m in manifests]
    assert "LeaderWorkerSet" in kinds
    for m in manifests:
        assert key_of(m) in possible, f"{key_of(m)} would never be cleaned up"
        assert m["metadata"]["ownerReferences"][0]["uid"] == "0d6c1a52-uid"
        assert m["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "glmserve-operator"
        if m["kind"] != "LeaderWorkerSet":
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(m, version, strict=True)
            continue
        assert lws_schema.schema_errors(m) == []
        assert lws_schema.webhook_errors(m) == []
        tmpl = m["spec"]["leaderWorkerTemplate"]
        for which in ("leaderTemplate", "workerTemplate"):
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(pod_template_object(tmpl[which], f"x-{which.lower()}"), version,
                                             strict=True)


def test_lws_schema_check_is_not_a_rubber_stamp():
    lws = build(GLM47_TWO_NODES)[("LeaderWorkerSet", "demo-decode-lws")]
    assert lws_schema.schema_errors(lws) == []
    bad = {**lws, "spec": {**lws["spec"], "startupPolicy": "WhenReady"}}
    assert any("startupPolicy" in e for e in lws_schema.schema_errors(bad))
    typo = {**lws, "spec": {**lws["spec"], "leaderWorkerTemplate": {**lws["spec"]["leaderWorkerTemplate"], "sise": 2}}}
    assert any("sise" in e for e in lws_schema.schema_errors(typo))
    wrong_type = {**lws, "spec": {**lws["spec"], "replicas": "two"}}
    assert lws_schema.schema_errors(wrong_type)
    stuck = {**lws, "spec": {**lws["spec"], "rolloutStrategy": {
        "type": "RollingUpdate", "rollingUpdateConfiguration": {"maxUnavailable": 0, "maxSurge": 0}}}}
    assert lws_schema.webhook_errors(stuck)


def test_group_spanning_two_nodes():
    ms = build(GLM47_TWO_NODES)
    assert ("Deployment", "demo-decode") not in ms and ("Deployment", "demo-prefill") not in ms
    assert ("Deployment", "demo-router") in ms
    lws = ms[("LeaderWorkerSet", "demo-decode-lws")]
    spec = lws["spec"]
    assert spec["replicas"] == 2  # two decode workers, each a group of two 8-GPU pods
    tmpl = spec["leaderWorkerTemplate"]
    assert tmpl["size"] == 2 and tmpl["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert spec["startupPolicy"] == "LeaderCreated"  # the leader is ready only once the workers joined it
    leader, worker = tmpl["leaderTemplate"], tmpl["workerTemplate"]
    for t in (leader, worker):
        c = t["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert (flag(c["args"], "--tensor-parallel-size"), flag(c["args"], "--nnodes")) == ("16", "2")
        assert "--enable-expert-parallel" in c["args"]
        assert {"name": "kv", "containerPort": 29600, "protocol": "TCP"} in c["ports"]  # decode ranks receive KV
        assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in t["spec"]["volumes"])
        assert t["metadata"]["annotations"][naming.CONFIG_HASH_ANNOTATION]
    lc, wc = leader["spec"]["containers"][0], worker["spec"]["containers"][0]
    assert lc["readinessProbe"]["httpGet"]["path"] == "/ready" and "startupProbe" in lc
    assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(wc)  # non-leader ranks serve no HTTP
    assert {p["name"] for p in lc["ports"]} == {"grpc", "http", "dist", "kv"}
    assert leader["metadata"]["labels"]["glmserve.io/group-rank"] == "leader"
    assert "glmserve.io/group-rank" not in worker["metadata"]["labels"]
    prefill = ms[("LeaderWorkerSet", "demo-prefill-lws")]["spec"]["leaderWorkerTemplate"]
    pc = prefill["workerTemplate"]["spec"]["containers"][0]
    assert "--enable-expert-parallel" not in pc["args"] and pc["ports"] == []
    assert pc["resources"]["limits"] == {"rdma/ib": 1, "nvidia.com/gpu": 8}
    assert {"name": "NCCL_IB_HCA", "value": "mlx5"} in pc["env"]
    # PDB: all pods of the role (a drain taking any pod of a group takes the group).
    pdb = ms[("PodDisruptionBudget", "demo-decode")]
    assert pdb["spec"]["selector"]["matchLabels"] == naming.selector_labels("demo", "decode")


def test_pods_find_their_leader_and_rank():
    ms = build(GLM47_TWO_NODES)
    lws = ms[("LeaderWorkerSet", "demo-decode-lws")]
    pods = pods_of(lws)
    assert [p.name for p in pods] == ["demo-decode-lws-0", "demo-decode-lws-0-1",
                                      "demo-decode-lws-1", "demo-decode-lws-1-1"]
    by_name = {p.name: p for p in pods}
    for pod in pods:
        args = pod.args()
        assert "$(" not in " ".join(args)  # every reference is one Kubernetes substitutes
        host, _, port = flag(args, "--dist-init-addr").rpartition(":")
        leader = by_name[f"demo-decode-lws-{pod.group}"]
        assert host == leader.dns_name and int(port) == naming.DIST_INIT_PORT  # its own group's leader
        assert any(p.get("name") == "dist" and p["containerPort"] == int(port) for p in leader.container["ports"])
        assert flag(args, "--node-rank") == str(pod.index) and flag(args, "--nnodes") == "2"
        assert flag(args, "--advertise-host") == pod.ip
    # The leaders' DNS names come from LWS's own headless Service, named after the LWS: none of ours may take it.
    assert not any(kind == "Service" and name == "demo-decode-lws" for kind, name in ms)


def test_router_service_selects_leaders_only():
    ms = build(GLM47_TWO_NODES)
    for role in ("prefill", "decode"):
        svc = ms[("Service", f"demo-{role}")]
        pods = pods_of(ms[("LeaderWorkerSet", f"demo-{role}-lws")])
        selected = [p for p in pods if svc["spec"]["selector"].items() <= p.labels.items()]
        assert [p.index for p in selected] == [0] * len(selected) and len(selected) == len({p.group for p in pods})
        named_ports = {p["name"] for p in selected[0].container["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= named_ports
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is False


def test_autoscaler_scales_groups():
    ms = build(MIXED_FOUR_NODES)
    assert ("Deployment", "demo-prefill") in ms  # TP 4 on 4-GPU nodes: one node
    lws = ms[("LeaderWorkerSet", "demo-decode-lws")]
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 4 and "replicas" not in lws["spec"]  # the HPA owns it
    assert lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["resources"] == \
        {"limits": {"nvidia.com/gpu": 4}}
    hpa = ms[("HorizontalPodAutoscaler", "demo-decode")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
                                             "name": "demo-decode-lws"}
    crd = lws_schema.lws_crd()["spec"]["versions"][0]
    assert crd["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"  # what the HPA scales


def test_switching_layout_replaces_the_workload():
    """TP 8 -> 16 turns the decode Deployment into a LeaderWorkerSet; reconcile deletes what is no longer built."""
    before = set(build(GLM47_ONE_NODE))
    after = set(build({**GLM47_ONE_NODE, "decode": {"tensorParallelSize": 16, "gpus": 16}}))
    assert ("Deployment", "demo-decode") in before - after
    assert ("LeaderWorkerSet", "demo-decode-lws") in after - before
    assert ("Deployment", "demo-prefill") in after
