"""The GLMDeployment spec as frozen dataclasses: built once per reconcile from the CRD-defaulted spec and handed
to the pure builders, which therefore never see a missing field or repeat a default."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from glmserve.operator import naming
from glmserve.operator.schema import defaulted_spec
from glmserve.operator.topology import PlacementError, Topology, place

RoleName = Literal["prefill", "decode"]


class SpecError(ValueError):
    """The spec cannot be turned into manifests (something the CRD schema could not rule out)."""


@dataclass(frozen=True)
class Placement:
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    affinity: dict[str, Any] = field(default_factory=dict)
    priority_class_name: str | None = None


@dataclass(frozen=True)
class PvcSource:
    claim_name: str
    path: str


@dataclass(frozen=True)
class HostPathSource:
    path: str


@dataclass(frozen=True)
class HubSource:
    repository: str
    revision: str
    token_secret_name: str | None
    token_secret_key: str
    cache_claim_name: str | None
    cache_size: str
    image: str | None


ModelSource = PvcSource | HostPathSource | HubSource


@dataclass(frozen=True)
class ImageSpec:
    repository: str
    tag: str
    pull_policy: str
    pull_secrets: tuple[str, ...]

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


@dataclass(frozen=True)
class EngineOptions:
    dtype: str
    load_format: str
    max_model_len: int | None
    chunked_prefill_size: int
    max_num_batched_tokens: int | None
    max_num_seqs: int | None
    block_size: int
    kv_cache_memory_fraction: float
    enable_prefix_caching: bool
    attention_backend: str
    cuda_graph_max_batch_size: int
    disable_cuda_graph: bool
    speculative_algorithm: str
    speculative_num_steps: int
    extra_args: tuple[str, ...]


@dataclass(frozen=True)
class Autoscaling:
    enabled: bool
    min_replicas: int
    max_replicas: int
    metric: str
    target_average_value: str | None
    target_cpu_utilization: int | None


@dataclass(frozen=True)
class RoleSpec:
    name: RoleName
    replicas: int
    tensor_parallel_size: int
    gpus: int
    gpu_resource_name: str
    shm_size: str
    drain_timeout_s: int
    termination_grace_s: int
    env: tuple[dict[str, Any], ...]
    placement: Placement
    engine: EngineOptions
    autoscaling: Autoscaling
    pdb_enabled: bool
    pdb_max_unavailable: int
    gpus_per_node: int
    enable_expert_parallel: bool
    topology: Topology  # one pod per worker, or a LeaderWorkerSet group spanning nodes


@dataclass(frozen=True)
class RouterSpec:
    replicas: int
    http_port: int
    service_type: str
    service_port: int
    node_port: int | None
    service_annotations: dict[str, str]
    routing_policy: str
    tool_call_parser: str | None
    reasoning_parser: str | None
    request_timeout_s: int | None
    placement: Placement


@dataclass(frozen=True)
class Monitoring:
    service_monitor: bool
    interval: str
    labels: dict[str, str]


@dataclass(frozen=True)
class DeploymentSpec:
    model_name: str
    source: ModelSource
    image: ImageSpec
    router: RouterSpec
    prefill: RoleSpec
    decode: RoleSpec
    kv_backend: str
    kv_port: int
    monitoring: Monitoring

    def role(self, name: str) -> RoleSpec:
        return self.prefill if name == "prefill" else self.decode


def parse_spec(raw: dict[str, Any]) -> DeploymentSpec:
    """Apply the CRD defaults to a raw `.spec` and freeze it. Raises SpecError for unusable specs."""
    s = defaulted_spec(raw)
    try:
        return DeploymentSpec(
            model_name=s["model"]["name"],
            source=_source(s["model"]["source"]),
            image=ImageSpec(s["image"]["repository"], s["image"]["tag"], s["image"]["pullPolicy"],
                            tuple(s["image"].get("pullSecrets", ()))),
            router=_router(s["router"]),
            prefill=_role("prefill", s["prefill"]),
            decode=_role("decode", s["decode"]),
            kv_backend=s["kvTransfer"]["backend"],
            kv_port=s["kvTransfer"]["port"],
            monitoring=Monitoring(s["monitoring"]["serviceMonitor"]["enabled"],
                                  s["monitoring"]["serviceMonitor"]["interval"],
                                  dict(s["monitoring"]["serviceMonitor"].get("labels", {}))),
        )
    except (KeyError, TypeError) as e:  # only reachable when the API server did not validate (e.g. no CRD schema)
        raise SpecError(f"malformed spec: missing or wrong field {e}") from e


def check_owner_name(spec: DeploymentSpec, owner_name: str) -> None:
    """A role spanning nodes needs room in the GLMDeployment's name for its LeaderWorkerSet's suffixes (the CRD's
    CEL rule checks the same where the API server runs it)."""
    spanning = [r.name for r in (spec.prefill, spec.decode) if r.topology.multi_node]
    if spanning and len(owner_name) > naming.MAX_OWNER_NAME_MULTI_NODE:
        raise SpecError(f"name {owner_name!r} has {len(owner_name)} characters; at most "
                        f"{naming.MAX_OWNER_NAME_MULTI_NODE} when a role spans several nodes ({', '.join(spanning)})")


def _placement(d: dict[str, Any]) -> Placement:
    return Placement(dict(d.get("resources", {})), dict(d.get("nodeSelector", {})), tuple(d.get("tolerations", ())),
                     dict(d.get("affinity", {})), d.get("priorityClassName"))


def _source(d: dict[str, Any]) -> ModelSource:
    given = [k for k in ("pvc", "hostPath", "hub") if k in d]
    if len(given) != 1:
        raise SpecError(f"model.source needs exactly one of pvc, hostPath, hub (got {given or 'none'})")
    if "pvc" in d:
        return PvcSource(d["pvc"]["claimName"], d["pvc"]["path"])
    if "hostPath" in d:
        return HostPathSource(d["hostPath"]["path"])
    h = d["hub"]
    token = h.get("tokenSecretRef") or {}
    return HubSource(h["repository"], h["revision"], token.get("name"), token.get("key", "token"),
                     h.get("cacheClaimName"), h["cacheSize"], h.get("image"))


def _engine(d: dict[str, Any]) -> EngineOptions:
    return EngineOptions(
        dtype=d["dtype"], load_format=d["loadFormat"], max_model_len=d.get("maxModelLen"),
        chunked_prefill_size=d["chunkedPrefillSize"], max_num_batched_tokens=d.get("maxNumBatchedTokens"),
        max_num_seqs=d.get("maxNumSeqs"), block_size=d["blockSize"], kv_cache_memory_fraction=d["kvCacheMemoryFraction"],
        enable_prefix_caching=d["enablePrefixCaching"], attention_backend=d["attentionBackend"],
        cuda_graph_max_batch_size=d["cudaGraphMaxBatchSize"], disable_cuda_graph=d["disableCudaGraph"],
        speculative_algorithm=d["speculative"]["algorithm"], speculative_num_steps=d["speculative"]["numSteps"],
        extra_args=tuple(d.get("extraArgs", ())),
    )


def _autoscaling(d: dict[str, Any] | None) -> Autoscaling:
    d = d or {"enabled": False, "minReplicas": 1, "maxReplicas": 1, "metric": "cpu"}
    return Autoscaling(d["enabled"], d["minReplicas"], d["maxReplicas"], d["metric"], d.get("targetAverageValue"),
                       d.get("targetCPUUtilizationPercentage"))


def _role(name: RoleName, d: dict[str, Any]) -> RoleSpec:
    try:
        topology = place(d["tensorParallelSize"], d["gpus"], d["gpusPerNode"])
    except PlacementError as e:  # the CRD's CEL rule says the same; this covers clusters without it
        raise SpecError(f"{name}: {e}") from e
    if d["enableExpertParallel"] and d["tensorParallelSize"] == 1:
        raise SpecError(f"{name}: enableExpertParallel needs tensorParallelSize above 1")
    return RoleSpec(
        name=name, replicas=d["replicas"], tensor_parallel_size=d["tensorParallelSize"], gpus=d["gpus"],
        gpu_resource_name=d["gpuResourceName"], shm_size=d["shmSize"], drain_timeout_s=d["drainTimeoutSeconds"],
        termination_grace_s=d["terminationGracePeriodSeconds"], env=tuple(d.get("env", ())), placement=_placement(d),
        engine=_engine(d["engine"]), autoscaling=_autoscaling(d.get("autoscaling")),
        pdb_enabled=d["disruptionBudget"]["enabled"], pdb_max_unavailable=d["disruptionBudget"]["maxUnavailable"],
        gpus_per_node=d["gpusPerNode"], enable_expert_parallel=d["enableExpertParallel"], topology=topology,
    )


def _router(d: dict[str, Any]) -> RouterSpec:
    svc = d["service"]
    return RouterSpec(
        replicas=d["replicas"], http_port=d["httpPort"], service_type=svc["type"], service_port=svc["port"],
        node_port=svc.get("nodePort"), service_annotations=dict(svc.get("annotations", {})),
        routing_policy=d["routingPolicy"], tool_call_parser=d.get("toolCallParser"),
        reasoning_parser=d.get("reasoningParser"), request_timeout_s=d.get("requestTimeoutSeconds"),
        placement=_placement(d),
    )
