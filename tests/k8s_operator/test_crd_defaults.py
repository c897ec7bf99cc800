"""Where the GLMDeployment CRD and the services have the same knob, the CRD's default is the services'
default: the config dataclass the CLI takes its defaults from (one source each)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from glmserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.operator import naming
from glmserve.operator.schema import apply_defaults
from glmserve.router.config import RouterConfig
from glmserve.worker.config import DEFAULT_PORTS, WorkerConfig
from tests.k8s_operator.samples import MINIMAL

ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = [ROOT / "operator" / "crd.yaml", ROOT / "charts" / "glmserve" / "crds" / "glmdeployments.glmserve.io.yaml"]

ENGINE, CACHE, SCHED = EngineConfig(model="m"), CacheConfig(), SchedulerConfig()
WORKER, ROUTER = WorkerConfig(role="decode", engine=ENGINE, served_model_name="m"), RouterConfig(model="m", served_model_name="m")

# CRD path (under spec; ROLE = prefill and decode) -> the services' default.
SAME_KNOBS = {
    "router.httpPort": ROUTER.port,
    "router.routingPolicy": ROUTER.routing_policy,
    "kvTransfer.backend": WORKER.kv_transfer_backend,
    "kvTransfer.port": WORKER.kv_port,
    "ROLE.drainTimeoutSeconds": WORKER.drain_timeout,
    "ROLE.tensorParallelSize": ENGINE.tensor_parallel_size,
    "ROLE.engine.dtype": ENGINE.dtype,
    "ROLE.engine.loadFormat": ENGINE.load_format,
    "ROLE.engine.chunkedPrefillSize": SCHED.chunked_prefill_size,
    "ROLE.engine.blockSize": CACHE.block_size,
    "ROLE.engine.kvCacheMemoryFraction": CACHE.gpu_memory_utilization,
    "ROLE.engine.enablePrefixCaching": CACHE.enable_prefix_caching,
    "ROLE.engine.attentionBackend": ENGINE.prefill_attention_backend,
    "ROLE.engine.cudaGraphMaxBatchSize": ENGINE.cuda_graph_max_batch_size,
    "ROLE.engine.disableCudaGraph": not ENGINE.enable_cuda_graph,
    "ROLE.engine.speculative.algorithm": ENGINE.speculative_algorithm,
    "ROLE.engine.speculative.numSteps": ENGINE.speculative_num_steps,
}
# Knobs the CRD leaves unset so the services' own default applies (a CRD default here would be a second source).
UNSET_KNOBS = ["ROLE.engine.maxModelLen", "ROLE.engine.maxNumBatchedTokens", "ROLE.engine.maxNumSeqs",
               "router.requestTimeoutSeconds"]


def _defaulted(crd_file: Path) -> dict:
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = crd["spec"]["versions"]
    return apply_defaults(version["schema"]["openAPIV3Schema"]["properties"]["spec"], MINIMAL)


def _paths(template: str) -> list[str]:
    return [template.replace("ROLE", r) for r in ("prefill", "decode")] if "ROLE" in template else [template]


def _get(spec: dict, path: str, missing=KeyError):
    node = spec
    for key in path.split("."):
        if key not in node:
            return missing
        node = node[key]
    return node


def _same(crd_value, want) -> bool:
    """Equal, and of the same kind (True is not 1); a whole number is fine where the service takes a float."""
    return crd_value == want and (isinstance(want, float) or type(crd_value) is type(want))


@pytest.mark.parametrize("crd_file", CRD_FILES, ids=lambda p: p.parent.name)
def test_crd_defaults_equal_the_config_dataclasses(crd_file):
    spec = _defaulted(crd_file)
    wrong = {path: (_get(spec, path), want) for template, want in SAME_KNOBS.items() for path in _paths(template)
             if not _same(_get(spec, path), want)}
    assert not wrong, f"CRD default != services' default: {wrong}"
    assert ENGINE.prefill_attention_backend == ENGINE.decode_attention_backend  # one CRD knob covers both
    set_anyway = [p for t in UNSET_KNOBS for p in _paths(t) if _get(spec, p) is not KeyError]
    assert not set_anyway, set_anyway


def test_operator_container_ports_are_the_workers_defaults():
    # The operator may not import glmserve.worker (it reaches the engine): it keeps its own copy, checked here.
    for role in ("prefill", "decode"):
        assert (naming.GRPC_PORT[role], naming.HTTP_PORT[role]) == DEFAULT_PORTS[role]
