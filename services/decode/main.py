"""`glmserve decode`: one decode worker process (or, with --node-rank > 0, one node's ranks of its group)."""

from __future__ import annotations

from glmserve.decode.service import DecodeService
from glmserve.protos import worker_pb2_grpc as pb_grpc
from glmserve.worker.config import WorkerConfig
from glmserve.worker.server import run_worker


def run_decode_worker(cfg: WorkerConfig) -> int:
    return run_worker(cfg, DecodeService, pb_grpc.add_DecodeWorkerServicer_to_server)
