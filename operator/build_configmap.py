"""The engine ConfigMap: the resolved command line of every service, in one place to inspect
(`kubectl get cm NAME-engine -o yaml`). The pods take these flags as their args; each pod template carries the
hash of its own section, so a change rolls exactly the role it concerns."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from glmserve.operator import naming
from glmserve.operator.args import router_args, worker_args
from glmserve.operator.pod import model_mount
from glmserve.operator.spec import DeploymentSpec


def engine_config(spec: DeploymentSpec, owner: naming.Owner) -> dict[str, dict[str, Any]]:
    """Per service: its args and the settings that shape its pods."""
    out: dict[str, dict[str, Any]] = {
        "router": {"image": spec.image.ref,
                   "args": router_args(spec, owner, model_mount(spec.source, spec.image, tokenizer_only=True).model_path)},
    }
    for role in (spec.prefill, spec.decode):
        out[role.name] = {
            "image": spec.image.ref,
            "args": worker_args(spec, role, model_mount(spec.source, spec.image).model_path),
            "gpus": role.gpus, "tensorParallelSize": role.tensor_parallel_size,
        }
    return out


def section_hash(section: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:16]


def build_engine_configmap(spec: DeploymentSpec, owner: naming.Owner) -> dict[str, Any]:
    config = engine_config(spec, owner)
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": naming.metadata(owner, naming.engine_configmap_name(owner.name), "engine-config", spec.image.tag),
        "data": {f"{name}.json": json.dumps(section, indent=2, sort_keys=True) for name, section in config.items()},
    }
