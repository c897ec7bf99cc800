"""GLMDeployment specs used across the tests, from minimal to every option set."""

from __future__ import annotations

import copy
from typing import Any

MINIMAL = {"model": {"name": "glm-4.7-flash", "source": {"pvc": {"claimName": "models", "path": "GLM-4.7-Flash"}}}}

TENSOR_PARALLEL_HOSTPATH = {
    "model": {"name": "glm-4.6", "source": {"hostPath": {"path": "/mnt/models/GLM-4.6"}}},
    "image": {"repository": "registry.example.com/glmserve", "tag": "0.1.0-cu13", "pullPolicy": "Always",
              "pullSecrets": ["regcred"]},
    "router": {"replicas": 2, "routingPolicy": "least-loaded", "toolCallParser": "glm45", "reasoningParser": "glm45",
               "requestTimeoutSeconds": 600, "resources": {"requests": {"cpu": "2", "memory": "4Gi"}}},
    "prefill": {"replicas": 2, "tensorParallelSize": 4, "gpus": 4,
                "resources": {"requests": {"cpu": "16", "memory": "256Gi"}, "limits": {"memory": "300Gi"}},
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
                        "matchLabels": {"app.kubernetes.io/component": "prefill"}}}}]}},
                "engine": {"attentionBackend": "fa3", "chunkedPrefillSize": 16384, "maxModelLen": 131072}},
    "decode": {"replicas": 4, "tensorParallelSize": 4, "gpus": 4, "shmSize": "32Gi",
               "env": [{"name": "NCCL_IB_DISABLE", "value": "0"}],
               "engine": {"attentionBackend": "flashinfer", "cudaGraphMaxBatchSize": 256, "maxNumSeqs": 256,
                          "speculative": {"algorithm": "mtp", "numSteps": 3}}},
    "kvTransfer": {"backend": "nccl", "port": 29700},
}

HUB_AUTOSCALED = {
    "model": {"name": "glm-4.7", "source": {"hub": {"repository": "zai-org/GLM-4.7-FP8", "revision": "main",
                                                    "tokenSecretRef": {"name": "hf-token"},
                                                    "cacheClaimName": "hf-cache"}}},
    "router": {"service": {"type": "LoadBalancer", "port": 443, "nodePort": 31443,
                           "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}}},
    "prefill": {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 8, "metric": "num_queued_tokens",
                                "targetAverageValue": "16k"},
                "disruptionBudget": {"maxUnavailable": 2}},
    "decode": {"replicas": 2, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 16, "metric": "cpu",
                                              "targetCPUUtilizationPercentage": 70},
               "engine": {"kvCacheMemoryFraction": 0.9, "extraArgs": ["--max-num-batched-tokens", "32768"]}},
    "monitoring": {"serviceMonitor": {"interval": "30s", "labels": {"release": "kube-prometheus-stack"}}},
}

CPU_DEMO = {
    "model": {"name": "tiny", "source": {"hub": {"repository": "glmserve/tiny-glm4-moe", "cacheSize": "2Gi"}}},
    "prefill": {"gpus": 0, "engine": {"dtype": "float32", "loadFormat": "dummy", "disableCudaGraph": True,
                                      "enablePrefixCaching": False, "attentionBackend": "torch"}},
    "decode": {"gpus": 0, "replicas": 0, "disruptionBudget": {"enabled": False},
               "engine": {"dtype": "float32", "attentionBackend": "torch"}},
    "kvTransfer": {"backend": "gloo"},
    "monitoring": {"serviceMonitor": {"enabled": False}},
}

# GLM-4.7 (355B, FP8) on one 8-GPU node per worker: TP 8 with the experts partitioned across the ranks.
GLM47_ONE_NODE = {
    "model": {"name": "glm-4.7", "source": {"pvc": {"claimName": "models", "path": "GLM-4.7-FP8"}}},
    "router": {"toolCallParser": "glm47", "reasoningParser": "glm45"},
    "prefill": {"tensorParallelSize": 8, "gpus": 8, "enableExpertParallel": True, "shmSize": "64Gi"},
    "decode": {"tensorParallelSize": 8, "gpus": 8, "enableExpertParallel": True, "shmSize": "64Gi"},
    "kvTransfer": {"backend": "nccl"},
}

# GLM-4.7 in bf16 across two 8-GPU nodes per worker (TP 16): LeaderWorkerSet groups of two pods.
GLM47_TWO_NODES = {
    "model": {"name": "glm-4.7", "source": {"pvc": {"claimName": "models", "path": "GLM-4.7"}}},
    "prefill": {"replicas": 1, "tensorParallelSize": 16, "gpus": 16, "gpusPerNode": 8, "shmSize": "64Gi",
                "resources": {"limits": {"rdma/ib": 1}},
                "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}]},
    "decode": {"replicas": 2, "tensorParallelSize": 16, "gpus": 16, "enableExpertParallel": True},
    "kvTransfer": {"backend": "nccl"},
}

# One role per node, the other across four 4-GPU nodes, with an autoscaler on the groups.
MIXED_FOUR_NODES = {
    "model": {"name": "glm-4.6", "source": {"hub": {"repository": "zai-org/GLM-4.6", "cacheClaimName": "hf-cache"}}},
    "prefill": {"tensorParallelSize": 4, "gpus": 4, "gpusPerNode": 4},
    "decode": {"tensorParallelSize": 16, "gpus": 16, "gpusPerNode": 4,
               "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "metric": "num_requests_waiting",
                               "targetAverageValue": "8"}},
}

VALID_SPECS = {"minimal": MINIMAL, "tp4-hostpath": TENSOR_PARALLEL_HOSTPATH, "hub-autoscaled": HUB_AUTOSCALED,
               "cpu-demo": CPU_DEMO, "glm47-one-node": GLM47_ONE_NODE}
# Specs with a role spanning nodes (a LeaderWorkerSet instead of that role's Deployment).
MULTI_NODE_SPECS = {"glm47-two-nodes": GLM47_TWO_NODES, "mixed-four-nodes": MIXED_FOUR_NODES}


def glmd_object(spec: dict[str, Any], name: str = "demo") -> dict[str, Any]:
    return {"apiVersion": "glmserve.io/v1alpha1", "kind": "GLMDeployment",
            "metadata": {"name": name, "namespace": "team-a"}, "spec": copy.deepcopy(spec)}


def with_changes(spec: dict[str, Any], *paths_values: tuple[str, Any]) -> dict[str, Any]:
    """A copy of `spec` with dotted paths set (None deletes)."""
    out = copy.deepcopy(spec)
    for path, value in paths_values:
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out
