"""The GLMDeployment CRD: one source, a valid structural schema, and it accepts what it should and rejects what it
should (schema keywords with jsonschema, cross-field CEL rules with cel-python)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from glmserve.operator.schema import apply_defaults, crd, defaulted_spec, openapi_schema
from tests.k8s_operator import crd_validation
from tests.k8s_operator.crd_validation import admit, to_json_schema
from tests.k8s_operator.samples import MINIMAL, VALID_SPECS, glmd_object, with_changes

ROOT = Path(__file__).resolve().parents[2]
needs_cel = pytest.mark.skipif(crd_validation.celpy is None, reason="cel-python (dev dependency) is not installed")


def test_chart_copy_is_identical_to_the_operator_source():
    source = ROOT / "operator" / "crd.yaml"
    copy = ROOT / "charts" / "glmserve" / "crds" / "glmdeployments.glmserve.io.yaml"
    assert copy.read_bytes() == source.read_bytes(), "run: cp operator/crd.yaml charts/glmserve/crds/glmdeployments.glmserve.io.yaml"


def test_crd_is_a_valid_kubernetes_object():
    assert kubernetes_validate.validate(crd(), "1.29", strict=True)
    spec = crd()["spec"]
    assert (spec["group"], spec["names"]["kind"], spec["names"]["shortNames"], spec["scope"]) == \
        ("glmserve.io", "GLMDeployment", ["glmd"], "Namespaced")
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.decode.replicas"
    assert [c["name"] for c in version["additionalPrinterColumns"]][:3] == ["Model", "Prefill-Ready", "Decode-Ready"]
    assert version["additionalPrinterColumns"][-1]["jsonPath"] == ".metadata.creationTimestamp"


def _walk(node, path="$"):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _lookup(json_path: str) -> dict:
    node = openapi_schema()
    for part in json_path.strip(".").split("."):
        part = part.split("[")[0]
        node = node["properties"][part]
    return node


def test_schema_is_structural_and_explained():
    for path, node in _walk(openapi_schema()):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), f"{path} mixes both"
        if path.startswith("$.spec") or path.startswith("$.status"):
            if not path.endswith("[]") and not path.endswith("{}"):
                assert node.get("description"), f"{path} has no description (kubectl explain shows it)"
        if "default" in node:
            errs = list(__import__("jsonschema").Draft202012Validator(to_json_schema(node)).iter_errors(
                apply_defaults(node, node["default"])))
            assert not errs, f"default of {path} is invalid: {errs[0].message}"
    # Every path a printer column or the scale subresource reads exists in the schema.
    version = crd()["spec"]["versions"][0]
    for col in version["additionalPrinterColumns"]:
        if not col["jsonPath"].startswith(".metadata") and "?(" not in col["jsonPath"]:
            assert _lookup(col["jsonPath"])
    for key in ("specReplicasPath", "statusReplicasPath", "labelSelectorPath"):
        assert _lookup(version["subresources"]["scale"][key])["type"] in ("integer", "string")


def test_defaults_come_from_the_crd():
    spec = defaulted_spec(MINIMAL)
    assert spec["decode"]["replicas"] == 1 and spec["prefill"]["engine"]["chunkedPrefillSize"] == 8192
    assert spec["router"]["service"] == {"type": "ClusterIP", "port": 80}
    assert spec["kvTransfer"] == {"backend": "auto", "port": 29600}
    assert spec["model"]["source"]["pvc"]["path"] == "GLM-4.7-Flash"  # given values are kept
    assert "autoscaling" not in spec["decode"]  # no default: absent means off
    assert MINIMAL["model"] == {"name": "glm-4.7-flash", "source": {"pvc": {"claimName": "models", "path": "GLM-4.7-Flash"}}}


@pytest.mark.parametrize("name", sorted(VALID_SPECS))
def test_valid_samples_are_accepted(name):
    assert admit(glmd_object(VALID_SPECS[name]), cel=crd_validation.celpy is not None) == []


def test_chart_and_docs_samples_are_accepted():
    values = yaml.safe_load((ROOT / "charts/glmserve/values.yaml").read_text())
    assert admit(glmd_object(values["sample"]["spec"]), cel=crd_validation.celpy is not None) == []
    docs = (ROOT / "docs/KUBERNETES.md").read_text()
    block = docs.split("```yaml\n", 1)[1].split("```", 1)[0]  # the first YAML block is the sample GLMDeployment
    sample = yaml.safe_load(block)
    assert sample["kind"] == "GLMDeployment"
    assert admit(sample, cel=crd_validation.celpy is not None) == []


SCHEMA_REJECTS = {
    "no model": ("model", None),
    "empty served name": ("model.name", ""),
    "negative replicas": ("decode.replicas", -1),
    "unknown routing policy": ("router.routingPolicy", "random"),
    "odd tensor parallel": ("prefill.tensorParallelSize", 3),
    "memory fraction above 1": ("decode.engine.kvCacheMemoryFraction", 1.5),
    "bad shm quantity": ("prefill.shmSize", "lots"),
    "relative hostPath": ("model.source", {"hostPath": {"path": "models/glm"}}),
    "bad hub repository": ("model.source", {"hub": {"repository": "no-slash"}}),
    "nodePort out of range": ("router.service", {"type": "NodePort", "nodePort": 80}),
    "bad scrape interval": ("monitoring.serviceMonitor.interval", "15 seconds"),
    "wrong type": ("decode.gpus", "one"),
    "more mtp steps than the engine drafts": ("decode.engine.speculative", {"algorithm": "mtp", "numSteps": 5}),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_REJECTS))
def test_schema_rejects(case):
    path, value = SCHEMA_REJECTS[case]
    errors = admit(glmd_object(with_changes(MINIMAL, (path, value))), cel=False)
    assert errors, f"{case} was accepted"


CEL_REJECTS = {
    "two model sources": (("model.source", {"pvc": {"claimName": "a"}, "hostPath": {"path": "/m"}}),
                          "exactly one of pvc, hostPath, hub"),
    "no model source": (("model.source", {}), "exactly one of pvc, hostPath, hub"),
    "gpus differ from tensor parallel": (("prefill", {"tensorParallelSize": 2, "gpus": 1}), "gpus must equal"),
    "tensor parallel on cpu": (("decode", {"tensorParallelSize": 2, "gpus": 0}), "gpus must equal"),
    "grace shorter than drain": (("decode", {"drainTimeoutSeconds": 120}), "terminationGracePeriodSeconds must exceed"),
    "fa3 on decode": (("decode", {"engine": {"attentionBackend": "fa3"}}), "prefill-only"),
    "nccl without gpus": (("kvTransfer", {"backend": "nccl"}), "needs GPUs"),
    "block sizes differ": (("decode", {"engine": {"blockSize": 32}}), "same blockSize"),
    "min above max": (("decode", {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2,
                                                  "targetAverageValue": "4"}}), "minReplicas must not exceed"),
    "autoscaling without target": (("prefill", {"autoscaling": {"enabled": True}}), "targetAverageValue"),
    "cpu autoscaling without utilisation": (("prefill", {"autoscaling": {"enabled": True, "metric": "cpu"}}),
                                            "targetCPUUtilizationPercentage"),
    "mtp steps without mtp": (("decode", {"engine": {"speculative": {"numSteps": 3}}}), "needs algorithm mtp"),
    "nodePort on ClusterIP": (("router", {"service": {"nodePort": 30080}}), "nodePort needs"),
}


@needs_cel
@pytest.mark.parametrize("case", sorted(CEL_REJECTS))
def test_cel_rules_reject(case):
    (path, value), message = CEL_REJECTS[case]
    spec = with_changes(MINIMAL, (path, value))
    if path == "kvTransfer":
        spec = with_changes(spec, ("prefill", {"gpus": 0}))
    errors = admit(glmd_object(spec))
    assert any(message in e for e in errors), errors


@needs_cel
def test_cel_rule_on_the_name():
    assert admit(glmd_object(MINIMAL, name="a" * 45)) == []
    assert any("DNS label" in e for e in admit(glmd_object(MINIMAL, name="a" * 46)))
    assert any("DNS label" in e for e in admit(glmd_object(MINIMAL, name="9lives")))
