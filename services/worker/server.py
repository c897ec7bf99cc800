"""Runs one worker process: HTTP side (health/metrics) first, then the model, then the gRPC server."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc
import torch

from glmserve.engine.async_engine import AsyncEngine
from glmserve.engine.memory_check import ModelTooLarge
from glmserve.engine.parallel.rank_group import run_follower_node
from glmserve.metrics import ServiceMetrics
from glmserve.worker.config import WorkerConfig
from glmserve.worker.engine_metrics import EngineMetrics
from glmserve.worker.errors import EngineSettingRefused
from glmserve.worker.exit import exit_now
from glmserve.worker.grpc_options import SERVER_OPTIONS
from glmserve.worker.http_server import create_worker_app, make_http_server
from glmserve.worker.lifecycle import Lifecycle, ServingState
from glmserve.worker.rank_group import build_worker_engine

log = logging.getLogger(__name__)


def run_worker(cfg: WorkerConfig, make_service: Callable, add_to_server: Callable) -> int:
    """A prefill or decode worker process. On node 0 (or a one-node group) it serves; on another node of a
    group spanning machines it only hosts that node's ranks, which follow node 0's leader, and ends with them."""
    if cfg.engine.node_rank > 0:
        try:
            code = run_follower_node(cfg.engine, torch.get_num_threads())
        except ValueError as exc:
            raise EngineSettingRefused(str(exc)) from None
        exit_now(code)
    asyncio.run(serve_worker(cfg, make_service, add_to_server))
    exit_now(0)  # no native teardown noise (see worker/exit.py)
    return 0


async def serve_worker(cfg: WorkerConfig, make_service: Callable, add_to_server: Callable) -> None:
    metrics = ServiceMetrics(cfg.role, cfg.served_model_name)
    lifecycle = Lifecycle()
    lifecycle.install_signal_handlers(cfg.drain_timeout)
    holder: dict = {}

    def load() -> dict:
        eng = holder.get("engine")
        return eng.stats() if eng is not None else {}

    # Bind the gRPC port before the model loads: a port in use fails in seconds, not after the load.
    server = grpc.aio.server(options=SERVER_OPTIONS)
    try:
        server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
    except RuntimeError as exc:
        raise SystemExit(f"{cfg.role} worker: cannot listen for gRPC on {cfg.host}:{cfg.grpc_port}; "
                         f"is the port in use? ({exc})") from None
    if cfg.metrics_compat == "vllm":
        from glmserve.metrics_vllm import engine_cache_info, install

        install(metrics, lambda: engine_cache_info(holder.get("engine")))
    http = make_http_server(create_worker_app(lifecycle, metrics, load), cfg.host, cfg.http_port)
    http_task = asyncio.create_task(http.serve())  # liveness answers while the model loads
    try:
        engine, group = await asyncio.to_thread(build_worker_engine, cfg.engine, cfg.role)
    except ValueError as exc:  # a setting this checkpoint or machine cannot honour (no MTP weights, fa3 on CPU)
        http.should_exit = True
        await http_task
        if isinstance(exc, ModelTooLarge):
            raise
        raise EngineSettingRefused(str(exc)) from None
    holder["engine"] = engine
    async_engine = AsyncEngine(engine)
    engine_metrics = EngineMetrics(metrics)
    async_engine.step_hooks.append(engine_metrics.on_step)
    async_engine.start()
    service = make_service(cfg, async_engine, metrics, lifecycle)
    add_to_server(service, server)
    await server.start()
    engine_metrics.refresh(engine)
    lifecycle.state = ServingState.SERVING
    log.info("%s worker serving %s: gRPC %s:%d, HTTP %s:%d", cfg.role, cfg.served_model_name, cfg.host,
             cfg.grpc_port, cfg.host, cfg.http_port)
    try:
        await lifecycle.stopped.wait()
    finally:
        await server.stop(grace=2)
        http.should_exit = True
        await http_task
        async_engine.stop()
        close = getattr(service, "close", None)
        if close is not None:
            close()
        if group is not None:
            group.close(engine.runner)
