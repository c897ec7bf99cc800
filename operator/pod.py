"""Pod template pieces shared by the router and the worker Deployments: model volume (and its download init
container), probes, security context, GPU resources and shared memory."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from glmserve.operator.spec import HostPathSource, HubSource, ImageSpec, Placement, PvcSource, ModelSource

MODEL_MOUNT = "/models"
RUN_AS_USER = 1000

# Downloads a hub snapshot: argv = repository, revision, target directory, then optional allow-patterns.
# huggingface_hub comes with the glmserve image (a dependency of tokenizers).
_DOWNLOAD_SCRIPT = (
    "import sys\n"
    "from huggingface_hub import snapshot_download\n"
    "repo, rev, out, *patterns = sys.argv[1:]\n"
    "snapshot_download(repo_id=repo, revision=rev, local_dir=out, allow_patterns=patterns or None)\n"
)
# What the router needs from the model directory: config, tokenizer and chat template, never the weights.
TOKENIZER_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")


@dataclass(frozen=True)
class ModelMount:
    """How a pod gets the model: volumes, the container mount, init containers, and the --model path."""

    volumes: list[dict[str, Any]]
    mount: dict[str, Any]
    init_containers: list[dict[str, Any]]
    model_path: str


def model_mount(source: ModelSource, image: ImageSpec, *, tokenizer_only: bool = False) -> ModelMount:
    if isinstance(source, PvcSource):
        vol = {"name": "model", "persistentVolumeClaim": {"claimName": source.claim_name, "readOnly": True}}
        path = f"{MODEL_MOUNT}/{source.path.strip('/')}" if source.path.strip("/") else MODEL_MOUNT
        return ModelMount([vol], {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}, [], path)
    if isinstance(source, HostPathSource):
        vol = {"name": "model", "hostPath": {"path": source.path, "type": "Directory"}}
        return ModelMount([vol], {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}, [], MODEL_MOUNT)
    return _hub_mount(source, image, tokenizer_only)


def _hub_mount(src: HubSource, image: ImageSpec, tokenizer_only: bool) -> ModelMount:
    if src.cache_claim_name:
        vol = {"name": "model", "persistentVolumeClaim": {"claimName": src.cache_claim_name}}
    else:
        vol = {"name": "model", "emptyDir": {"sizeLimit": src.cache_size}}
    target = f"{MODEL_MOUNT}/{src.repository.replace('/', '--')}/{src.revision}"
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": f"{MODEL_MOUNT}/.hf-home"}]
    if src.token_secret_name:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": src.token_secret_name, "key": src.token_secret_key}}})
    init = {
        "name": "download-model",
        "image": src.image or image.ref,
        "imagePullPolicy": image.pull_policy,
        "command": ["python", "-c", _DOWNLOAD_SCRIPT, src.repository, src.revision, target,
                    *(TOKENIZER_PATTERNS if tokenizer_only else ())],
        "env": env,
        "volumeMounts": [{"name": "model", "mountPath": MODEL_MOUNT}],
        "securityContext": container_security_context(read_only_root=True),
    }
    # The server only reads the model; the init container is the one writer.
    return ModelMount([vol], {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}, [init], target)


def pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context(*, read_only_root: bool) -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": read_only_root,
            "capabilities": {"drop": ["ALL"]}}


def http_probes(port: str, ready_path: str) -> dict[str, Any]:
    """Liveness on /health, readiness on `ready_path`; a startup probe gives model loading up to 30 minutes
    before liveness may kill the pod."""
    def get(path: str) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": port}}
    return {
        "startupProbe": {**get("/health"), "periodSeconds": 10, "failureThreshold": 180},
        "livenessProbe": {**get("/health"), "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "readinessProbe": {**get(ready_path), "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
    }


def gpu_resources(resources: dict[str, Any], gpus: int, resource_name: str) -> dict[str, Any]:
    """The user's resources with the GPU count set as a limit (extended resources need no request)."""
    out = copy.deepcopy(resources)
    if gpus > 0:
        out.setdefault("limits", {})[resource_name] = gpus
    return out


def shm_volume(size: str) -> dict[str, Any]:
    # The container runtime's default /dev/shm (64 MiB) is far too small for NCCL.
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}


def apply_placement(pod_spec: dict[str, Any], placement: Placement) -> dict[str, Any]:
    if placement.node_selector:
        pod_spec["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        pod_spec["tolerations"] = [copy.deepcopy(t) for t in placement.tolerations]
    if placement.affinity:
        pod_spec["affinity"] = copy.deepcopy(placement.affinity)
    if placement.priority_class_name:
        pod_spec["priorityClassName"] = placement.priority_class_name
    return pod_spec


def image_pull_secrets(image: ImageSpec) -> list[dict[str, str]]:
    return [{"name": n} for n in image.pull_secrets]
