"""`glmserve prefill`: one prefill worker process."""

from __future__ import annotations

import asyncio

from glmserve.prefill.service import PrefillService
from glmserve.protos import worker_pb2_grpc as pb_grpc
from glmserve.worker.config import WorkerConfig
from glmserve.worker.server import serve_worker


def run_prefill_worker(cfg: WorkerConfig) -> int:
    asyncio.run(serve_worker(cfg, PrefillService, pb_grpc.add_PrefillWorkerServicer_to_server))
    return 0
