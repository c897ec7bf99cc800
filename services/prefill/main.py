"""`glmserve prefill`: one prefill worker process (or, with --node-rank > 0, one node's ranks of its group)."""

from __future__ import annotations

from glmserve.prefill.service import PrefillService
from glmserve.protos import worker_pb2_grpc as pb_grpc
from glmserve.worker.config import WorkerConfig
from glmserve.worker.server import run_worker


def run_prefill_worker(cfg: WorkerConfig) -> int:
    return run_worker(cfg, PrefillService, pb_grpc.add_PrefillWorkerServicer_to_server)
