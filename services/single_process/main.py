"""`glmserve serve`: build the engine, wrap it as the router's backend, serve HTTP."""

from __future__ import annotations

from glmserve.engine.async_engine import AsyncEngine
from glmserve.engine.config import EngineConfig
from glmserve.engine.engine import LLMEngine
from glmserve.metrics import ServiceMetrics
from glmserve.router.app import create_app
from glmserve.router.config import RouterConfig
from glmserve.router.main import serve_http
from glmserve.router.state import RouterState
from glmserve.single_process.backend import InProcessBackend
from glmserve.worker.engine_metrics import EngineMetrics


def run_single_process(cfg: RouterConfig, engine_cfg: EngineConfig) -> int:
    metrics = ServiceMetrics("router", cfg.served_model_name)
    async_engine = AsyncEngine(LLMEngine(engine_cfg))
    async_engine.step_hooks.append(EngineMetrics(metrics).on_step)
    return serve_http(create_app(RouterState.build(cfg, InProcessBackend(async_engine), metrics)), cfg)
