"""`glmserve prefill`: one prefill worker process."""

from __future__ import annotations

import asyncio

from glmserve.prefill.service import PrefillService
from glmserve.protos import worker_pb2_grpc as pb_grpc
from glmserve.worker.config import WorkerConfig
from glmserve.worker.exit import exit_now
from glmserve.worker.server import serve_worker


def run_prefill_worker(cfg: WorkerConfig) -> int:
    asyncio.run(serve_worker(cfg, PrefillService, pb_grpc.add_PrefillWorkerServicer_to_server))
    exit_now(0)  # no native teardown noise (see worker/exit.py)
    return 0
