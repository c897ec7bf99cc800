"""The pure builders: for a range of specs every manifest validates against Kubernetes' own schemas, carries the
owner reference and app.kubernetes.io labels, and wires pods, Services and flags together consistently."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest

from glmserve.metrics import METRICS
from glmserve.operator import naming
from glmserve.operator.build_rbac import ROUTER_RULES
from glmserve.operator.manifests import build_all, key_of, possible_children
from glmserve.operator.spec import SpecError, parse_spec
from tests.k8s_operator.monitoring_schemas import SERVICE_MONITOR_SCHEMA
from tests.k8s_operator.samples import CPU_DEMO, HUB_AUTOSCALED, MINIMAL, TENSOR_PARALLEL_HOSTPATH, VALID_SPECS

OWNER = naming.Owner("demo", "team-a", "0d6c1a52-uid", generation=3)
K8S_VERSIONS = ("1.29", "1.35")


def build(spec: dict, *, sm: bool = True) -> dict[tuple[str, str], dict]:
    return {(m["kind"], m["metadata"]["name"]): m for m in build_all(parse_spec(spec), OWNER, service_monitor_api=sm)}


def container(ms, name: str) -> dict:
    return ms[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("spec_name", sorted(VALID_SPECS))
def test_every_manifest_validates_and_is_owned(spec_name):
    manifests = build_all(parse_spec(VALID_SPECS[spec_name]), OWNER, service_monitor_api=True)
    assert len({key_of(m) for m in manifests}) == len(manifests)
    possible = set(possible_children(OWNER.name))
    for m in manifests:
        if m["kind"] == "ServiceMonitor":
            jsonschema.validate(m, SERVICE_MONITOR_SCHEMA)
        else:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(m, version, strict=True)
        meta = m["metadata"]
        assert key_of(m) in possible, f"{key_of(m)} would never be cleaned up"
        assert meta["namespace"] == "team-a" and len(meta["name"]) <= 63
        assert meta["ownerReferences"] == [{"apiVersion": "glmserve.io/v1alpha1", "kind": "GLMDeployment",
                                            "name": "demo", "uid": "0d6c1a52-uid", "controller": True,
                                            "blockOwnerDeletion": True}]
        labels = meta["labels"]
        for key in ("name", "instance", "component", "part-of", "managed-by", "version"):
            assert labels[f"app.kubernetes.io/{key}"], key
        assert labels["app.kubernetes.io/instance"] == "demo"
        assert labels["app.kubernetes.io/managed-by"] == "glmserve-operator"


@pytest.mark.parametrize("spec_name", sorted(VALID_SPECS))
def test_selectors_ports_and_probes_line_up(spec_name):
    ms = build(VALID_SPECS[spec_name])
    deployments = {n: m for (k, n), m in ms.items() if k == "Deployment"}
    assert set(deployments) == {"demo-router", "demo-prefill", "demo-decode"}
    for name, dep in deployments.items():
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        c = pod["containers"][0]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        assert c["readinessProbe"]["httpGet"]["path"] == ("/health" if name == "demo-router" else "/ready")
        port_names = {p["name"] for p in c["ports"]}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["port"] in port_names
        mounts = {v["name"] for v in c["volumeMounts"]}
        assert mounts <= {v["name"] for v in pod["volumes"]}
    for (kind, name), svc in ms.items():
        if kind != "Service":
            continue
        component = svc["spec"]["selector"]["app.kubernetes.io/component"]
        target = deployments[naming.router_name("demo") if component == "router" else f"demo-{component}"]
        assert svc["spec"]["selector"].items() <= target["spec"]["template"]["metadata"]["labels"].items()
        named = {p["name"] for p in target["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= named
        if component != "router":
            assert svc["spec"]["clusterIP"] == "None"  # headless: the router's discovery sees every pod
    for (kind, _), pdb in ms.items():
        if kind == "PodDisruptionBudget":
            comp = pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
            assert any(d["spec"]["selector"] == pdb["spec"]["selector"] for d in deployments.values()), comp


def test_worker_flags_follow_the_spec():
    ms = build(TENSOR_PARALLEL_HOSTPATH)
    prefill, decode = container(ms, "demo-prefill"), container(ms, "demo-decode")
    assert prefill["args"][:3] == ["prefill", "--model", "/models"] and decode["args"][0] == "decode"
    assert flag(prefill["args"], "--tensor-parallel-size") == "4" and prefill["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert flag(prefill["args"], "--prefill-attention-backend") == "fa3"
    assert flag(prefill["args"], "--chunked-prefill-size") == "16384" and flag(prefill["args"], "--max-model-len") == "131072"
    assert "--kv-port" not in prefill["args"] and "--decode-attention-backend" not in prefill["args"]
    assert flag(decode["args"], "--decode-attention-backend") == "flashinfer"
    assert flag(decode["args"], "--kv-port") == "29700" and {"name": "kv", "containerPort": 29700, "protocol": "TCP"} in decode["ports"]
    assert flag(decode["args"], "--speculative-algorithm") == "mtp" and flag(decode["args"], "--speculative-num-steps") == "3"
    # The prefill workers run MTP for the decode workers (its KV over the prompt), with no setting of their own.
    assert flag(prefill["args"], "--speculative-algorithm") == "mtp" and flag(prefill["args"], "--speculative-num-steps") == "3"
    assert flag(decode["args"], "--kv-transfer-backend") == "nccl"
    assert flag(decode["args"], "--served-model-name") == "glm-4.6"
    assert decode["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"  # for --advertise-host
    assert decode["env"][1:] == [{"name": "NCCL_IB_DISABLE", "value": "0"}]
    decode_pod = ms[("Deployment", "demo-decode")]["spec"]["template"]["spec"]
    shm = next(v for v in decode_pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert decode_pod["terminationGracePeriodSeconds"] > int(flag(decode["args"], "--drain-timeout"))
    assert decode_pod["automountServiceAccountToken"] is False
    prefill_pod = ms[("Deployment", "demo-prefill")]["spec"]["template"]["spec"]
    assert prefill_pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert prefill_pod["tolerations"][0]["key"] == "nvidia.com/gpu" and "podAntiAffinity" in prefill_pod["affinity"]
    assert "tolerations" not in decode_pod and prefill_pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert container(ms, "demo-prefill")["image"] == "registry.example.com/glmserve:0.1.0-cu13"


def test_router_discovers_its_own_workers_with_least_privilege():
    ms = build(TENSOR_PARALLEL_HOSTPATH)
    router = container(ms, "demo-router")
    a = router["args"]
    assert (flag(a, "--discovery"), flag(a, "--namespace")) == ("kubernetes", "team-a")
    assert (flag(a, "--prefill-service"), flag(a, "--decode-service")) == ("demo-prefill", "demo-decode")
    assert ("Service", "demo-prefill") in ms and ("Service", "demo-decode") in ms
    assert (flag(a, "--tool-call-parser"), flag(a, "--reasoning-parser"), flag(a, "--routing-policy")) == \
        ("glm45", "glm45", "least-loaded")
    assert flag(a, "--request-timeout") == "600"
    pod = ms[("Deployment", "demo-router")]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "demo-router" and ("ServiceAccount", "demo-router") in ms
    assert ms[("Role", "demo-router")]["rules"] == ROUTER_RULES
    assert all("*" not in r["verbs"] + r["resources"] for r in ROUTER_RULES)
    binding = ms[("RoleBinding", "demo-router")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-router", "namespace": "team-a"}]
    assert router["securityContext"]["readOnlyRootFilesystem"] is True


def test_hub_source_downloads_in_an_init_container():
    ms = build(HUB_AUTOSCALED)
    for name, tokenizer_only in (("demo-decode", False), ("demo-router", True)):
        pod = ms[("Deployment", name)]["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["command"][3:6] == ["zai-org/GLM-4.7-FP8", "main", "/models/zai-org--GLM-4.7-FP8/main"]
        assert ("*.json" in init["command"]) is tokenizer_only  # the router never downloads the weights
        token = next(e for e in init["env"] if e["name"] == "HF_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "hf-cache"}
        assert pod["containers"][0]["volumeMounts"][0]["readOnly"] is True
        assert flag(pod["containers"][0]["args"], "--model") == "/models/zai-org--GLM-4.7-FP8/main"
    cpu = build(CPU_DEMO)
    vol = cpu[("Deployment", "demo-prefill")]["spec"]["template"]["spec"]["volumes"][0]
    assert vol["emptyDir"] == {"sizeLimit": "2Gi"}
    assert "limits" not in container(cpu, "demo-prefill")["resources"]  # gpus: 0 asks for no GPU


def test_autoscaling_hands_replicas_to_the_hpa():
    ms = build(HUB_AUTOSCALED)
    for role in ("prefill", "decode"):
        assert "replicas" not in ms[("Deployment", f"demo-{role}")]["spec"]
        hpa = ms[("HorizontalPodAutoscaler", f"demo-{role}")]
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"demo-{role}"}
    pods_metric = ms[("HorizontalPodAutoscaler", "demo-prefill")]["spec"]["metrics"][0]["pods"]
    assert pods_metric["metric"]["name"] == "glmserve_num_queued_tokens" and pods_metric["target"]["averageValue"] == "16k"
    assert METRICS["num_queued_tokens"][0] == "gauge"
    cpu = ms[("HorizontalPodAutoscaler", "demo-decode")]["spec"]["metrics"][0]["resource"]
    assert cpu == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    assert ms[("PodDisruptionBudget", "demo-prefill")]["spec"]["maxUnavailable"] == 2
    sm = ms[("ServiceMonitor", "demo")]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack" and sm["spec"]["endpoints"][0]["interval"] == "30s"
    assert build(MINIMAL)[("Deployment", "demo-decode")]["spec"]["replicas"] == 1


def test_optional_children_are_left_out():
    ms = build(CPU_DEMO)
    assert ("PodDisruptionBudget", "demo-decode") not in ms and ("PodDisruptionBudget", "demo-prefill") in ms
    assert not any(k == "HorizontalPodAutoscaler" for k, _ in ms)
    assert not any(k == "ServiceMonitor" for k, _ in ms)
    assert ms[("Deployment", "demo-decode")]["spec"]["replicas"] == 0
    assert not any(k == "ServiceMonitor" for k, _ in build(MINIMAL, sm=False))  # the CRD is not installed


def test_a_decode_change_leaves_prefill_untouched():
    base = build(MINIMAL)
    edited = copy.deepcopy(MINIMAL)
    edited["decode"] = {"replicas": 5, "engine": {"maxNumSeqs": 64}}
    after = build(edited)
    for key in base:
        if key not in {("Deployment", "demo-decode"), ("ConfigMap", "demo-engine")}:
            assert after[key] == base[key], key
    hash_key = naming.CONFIG_HASH_ANNOTATION
    dec = lambda ms: ms[("Deployment", "demo-decode")]["spec"]["template"]["metadata"]["annotations"][hash_key]
    assert dec(after) != dec(base)
    assert after[("Deployment", "demo-decode")]["spec"]["replicas"] == 5


def test_builders_are_pure():
    spec = parse_spec(TENSOR_PARALLEL_HOSTPATH)
    first = build_all(spec, OWNER, service_monitor_api=True)
    first[0]["metadata"]["labels"]["mutated"] = "yes"
    second = build_all(spec, OWNER, service_monitor_api=True)
    assert "mutated" not in second[0]["metadata"]["labels"]
    assert build_all(spec, OWNER, service_monitor_api=True) == second


def test_spec_errors_name_the_problem():
    with pytest.raises(SpecError, match="exactly one of pvc, hostPath, hub"):
        parse_spec({"model": {"name": "m", "source": {}}})
    with pytest.raises(SpecError, match="malformed spec"):
        parse_spec({"model": {"source": {"pvc": {"claimName": "x"}}}})


def test_label_values_are_sanitised():
    assert naming.label_value("registry/x:1.0+cu13") == "registry_x_1.0_cu13"
    assert len(naming.label_value("v" * 100)) == 63
