"""Check a LeaderWorkerSet as a cluster with LWS installed would: against the openAPIV3Schema of LWS's own CRD
(vendored from kubernetes-sigs/lws, see the file's header) and the checks of LWS's validating webhook.

The schema is made strict: the API server silently prunes fields a structural schema does not declare, so a
misspelt field would be dropped, not rejected; here it is an error.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tests.k8s_operator.crd_validation import to_json_schema

CRD_FILE = Path(__file__).parent / "vendor" / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the file is 1.3 MB: the C parser reads it in 0.3 s


@functools.cache
def lws_crd() -> dict[str, Any]:
    return yaml.load(CRD_FILE.read_text(), Loader=_Loader)


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if "properties" in node and "additionalProperties" not in node and \
            not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    crd = lws_crd()
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    # metadata is validated by the API server itself (ObjectMeta), not by the CRD's schema.
    schema = {**schema, "properties": {**schema["properties"], "metadata": {"type": "object"}}}
    return jsonschema.Draft202012Validator(_strict(to_json_schema(schema)))


def schema_errors(obj: dict[str, Any]) -> list[str]:
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(obj)]
    crd = lws_crd()["spec"]
    if obj.get("apiVersion") != f"{crd['group']}/v1" or obj.get("kind") != crd["names"]["kind"]:
        errors.append(f"not a {crd['names']['kind']} of {crd['group']}/v1: {obj.get('apiVersion')} {obj.get('kind')}")
    return errors


_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def webhook_errors(obj: dict[str, Any]) -> list[str]:
    """What LWS's validating webhook (pkg/webhooks/leaderworkerset_webhook.go, v0.10.0) checks on create, for the
    fields we set: the name is a DNS-1035 label (it names the LWS's headless Service), size at least 1, and a
    rolling update that can make progress (maxUnavailable and maxSurge not both 0)."""
    errors = []
    name = obj["metadata"]["name"]
    if len(name) > 63 or not _DNS1035.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label")
    spec = obj["spec"]
    if spec["leaderWorkerTemplate"].get("size", 1) < 1:
        errors.append("spec.leaderWorkerTemplate.size must be equal or greater than 1")
    rolling = (spec.get("rolloutStrategy") or {}).get("rollingUpdateConfiguration") or {}
    if rolling.get("maxUnavailable", 1) == 0 and rolling.get("maxSurge", 0) == 0 and spec.get("replicas", 1) != 0:
        errors.append("maxUnavailable must not be 0 when maxSurge is 0")
    return errors
