"""A worker's small HTTP side: /health (liveness), /ready (readiness), /metrics (Prometheus), /load."""

from __future__ import annotations

from typing import Callable

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from glmserve.metrics import ServiceMetrics
from glmserve.worker.lifecycle import Lifecycle


def create_worker_app(lifecycle: Lifecycle, metrics: ServiceMetrics, load: Callable[[], dict]) -> FastAPI:
    app = FastAPI(title="glmserve worker")

    @app.get("/health")
    async def health():
        return {"status": "ok", "state": lifecycle.state.value}

    @app.get("/ready")
    async def ready():
        if lifecycle.accepting:
            return {"status": "ready"}
        return JSONResponse({"status": lifecycle.state.value}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/load")
    async def load_report():
        return load()

    return app


def make_http_server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # the worker's Lifecycle owns SIGTERM/SIGINT
    return server
