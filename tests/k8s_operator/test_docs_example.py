"""The example the README tells users to `kubectl apply` is accepted by the CRD's schema and CEL rules, and
the operator builds valid manifests from it."""

from pathlib import Path

import yaml

from tests.k8s_operator.crd_validation import admit

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "glm-flash.yaml"


def test_readme_example_is_admitted_by_the_crd():
    obj = yaml.safe_load(EXAMPLE.read_text())
    assert obj["kind"] == "GLMDeployment"
    assert admit(obj) == []


def test_a_broken_copy_is_rejected():
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["spec"]["decode"]["replicas"] = -1
    assert admit(obj)
