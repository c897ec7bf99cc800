"""Worker configuration (prefill and decode), built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass

from glmserve.engine.config import EngineConfig


# Each role's default (gRPC, HTTP) ports: distinct, so one prefill and one decode worker share a host.
DEFAULT_PORTS = {"prefill": (50061, 8101), "decode": (50071, 8201)}


@dataclass(frozen=True)
class WorkerConfig:
    role: str  # prefill | decode
    engine: EngineConfig
    served_model_name: str
    host: str = "127.0.0.1"
    grpc_port: int = DEFAULT_PORTS["prefill"][0]
    http_port: int = DEFAULT_PORTS["prefill"][1]
    # Address other processes use to reach this worker (advertised in KV link addresses).
    advertise_host: str = "127.0.0.1"
    kv_port: int = 29600  # decode only: the KV link's TCPStore
    # Decode admission: requests waiting for KV blocks; beyond this they are refused (retriable).
    max_waiting_requests: int = 256
    admission_timeout: float = 30.0
    # Prefill + KV transfer must finish within this, else the request fails (no hang on a dead peer).
    prefill_timeout: float = 120.0
    kv_timeout: float = 30.0
    drain_timeout: float = 30.0
    kv_transfer_backend: str = "auto"  # auto | nccl | gloo
    metrics_compat: str | None = None  # "vllm": also export vLLM's metric names
