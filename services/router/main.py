"""`glmserve router`: the HTTP front of the disaggregated workers (`glmserve serve` is in glmserve.single_process)."""

from __future__ import annotations

import logging

import uvicorn

from glmserve.engine.config import read_model_config
from glmserve.metrics import ServiceMetrics
from glmserve.router.app import create_app
from glmserve.router.backend import ModelInfo
from glmserve.router.config import RouterConfig
from glmserve.router.discovery import WorkerDiscovery
from glmserve.router.state import RouterState

log = logging.getLogger(__name__)


def model_info_from_dir(model_dir: str, max_model_len: int | None) -> ModelInfo:
    cfg = read_model_config(model_dir)
    limit = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    return ModelInfo(limit, cfg.vocab_size, frozenset(cfg.eos_token_ids))


def serve_http(app, cfg: RouterConfig) -> int:
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def run_router(cfg: RouterConfig, discovery: WorkerDiscovery, max_model_len: int | None) -> int:
    from glmserve.router.grpc_backend import DisaggregatedBackend
    from glmserve.router.worker_pool import WorkerPool

    metrics = ServiceMetrics("router", cfg.served_model_name)
    pool = WorkerPool(discovery, metrics, poll_interval=cfg.health_interval, policy=cfg.routing_policy)
    backend = DisaggregatedBackend(pool, model_info_from_dir(cfg.model, max_model_len), cfg.worker_wait_timeout)
    return serve_http(create_app(RouterState.build(cfg, backend, metrics)), cfg)
