"""`glmserve serve`: build the engine, wrap it as the router's backend, serve HTTP."""

from __future__ import annotations

import logging
import os

import torch

from glmserve.engine.async_engine import AsyncEngine
from glmserve.engine.config import EngineConfig
from glmserve.engine.engine import LLMEngine
from glmserve.engine.parallel.rank_group import run_follower_node, start_rank_group
from glmserve.metrics import ServiceMetrics
from glmserve.router.app import create_app
from glmserve.router.config import RouterConfig
from glmserve.router.main import serve_http
from glmserve.router.state import RouterState
from glmserve.single_process.backend import InProcessBackend
from glmserve.worker.engine_metrics import EngineMetrics


def run_single_process(cfg: RouterConfig, engine_cfg: EngineConfig, metrics_compat: str | None = None) -> int:
    if engine_cfg.node_rank > 0:  # this machine only hosts ranks; node 0 serves HTTP
        try:
            return run_follower_node(engine_cfg, torch.get_num_threads())
        except ValueError as exc:
            raise SystemExit(f"glmserve serve: {exc}") from None
    metrics = ServiceMetrics("router", cfg.served_model_name)
    try:
        # TP > 1: the other ranks start here and follow this process's steps; one that dies ends the server.
        engine_cfg, group = start_rank_group(engine_cfg, torch.get_num_threads(), on_rank_death=_stop_serving)
        engine = LLMEngine(engine_cfg)
        if group is not None:
            group.attach(engine.runner)
    except ValueError as exc:  # a setting this machine cannot honour (e.g. fa3 without CUDA): one line, no traceback
        raise SystemExit(f"glmserve serve: {exc}") from None
    if metrics_compat == "vllm":
        from glmserve.metrics_vllm import engine_cache_info, install

        install(metrics, lambda: engine_cache_info(engine))
    async_engine = AsyncEngine(engine)
    async_engine.step_hooks.append(EngineMetrics(metrics).on_step)
    try:
        return serve_http(create_app(RouterState.build(cfg, InProcessBackend(async_engine), metrics)), cfg)
    finally:
        if group is not None:
            group.close(engine.runner)


def _stop_serving(reason: str) -> None:
    """A tensor-parallel rank died: the worker cannot compute a step any more, so it exits at once (the
    rank group logged which rank); its supervisor or pod restarts it and the router drops it meanwhile."""
    logging.getLogger(__name__).error("glmserve serve: %s; exiting", reason)
    os._exit(1)
