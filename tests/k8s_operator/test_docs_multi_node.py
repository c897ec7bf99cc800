"""The worked examples of docs/KUBERNETES.md (GLM-4.7 on one 8-GPU node, and across two) are admitted by the
CRD and become the layout the text describes."""

from __future__ import annotations

from pathlib import Path

import yaml

from glmserve.operator import naming
from glmserve.operator.manifests import build_all
from glmserve.operator.spec import check_owner_name, parse_spec
from tests.k8s_operator import crd_validation, lws_schema
from tests.k8s_operator.crd_validation import admit

DOC = Path(__file__).resolve().parents[2] / "docs" / "KUBERNETES.md"


def examples() -> dict[str, dict]:
    blocks = [yaml.safe_load(b.split("```", 1)[0]) for b in DOC.read_text().split("```yaml\n")[1:]]
    return {b["metadata"]["name"]: b for b in blocks if b.get("kind") == "GLMDeployment"}


def built(obj: dict) -> dict[tuple[str, str], dict]:
    assert admit(obj, cel=crd_validation.celpy is not None) == []
    owner = naming.Owner(obj["metadata"]["name"], obj["metadata"]["namespace"], "uid")
    spec = parse_spec(obj["spec"])
    check_owner_name(spec, owner.name)
    return {(m["kind"], m["metadata"]["name"]): m for m in build_all(spec, owner, service_monitor_api=False)}


def test_glm47_on_one_node_per_worker():
    ms = built(examples()["glm47-one-node"])
    assert not any(kind == "LeaderWorkerSet" for kind, _ in ms)
    pods = 0
    for role in ("prefill", "decode"):
        dep = ms[("Deployment", f"glm47-one-node-{role}")]
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 and "--enable-expert-parallel" in c["args"]
        pods += dep["spec"]["replicas"]
    assert pods == 3  # "three nodes in all"


def test_glm47_across_two_nodes_per_worker():
    ms = built(examples()["glm47-two-nodes"])
    assert not any(kind == "Deployment" and name != "glm47-two-nodes-router" for kind, name in ms)
    nodes = 0
    for role in ("prefill", "decode"):
        lws = ms[("LeaderWorkerSet", f"glm47-two-nodes-{role}-lws")]
        assert lws_schema.schema_errors(lws) == []
        tmpl = lws["spec"]["leaderWorkerTemplate"]
        assert tmpl["size"] == 2
        c = tmpl["workerTemplate"]["spec"]["containers"][0]
        assert c["resources"]["limits"] == {"rdma/ib": 1, "nvidia.com/gpu": 8}
        assert c["args"][c["args"].index("--dist-init-addr") + 1] == "$(LWS_LEADER_ADDRESS):29500"
        nodes += lws["spec"]["replicas"] * tmpl["size"]
    assert nodes == 6  # "six nodes in all"
    assert "kubectl apply --server-side -f https://github.com/kubernetes-sigs/lws/releases/download/v0.10.0/" \
           "manifests.yaml" in DOC.read_text()
    vendored = lws_schema.CRD_FILE.read_text().splitlines()[2]
    assert "tag v0.10.0" in vendored  # the docs install the LWS version the tests validate against
