"""A worker's LoadReport (what the router polls to choose workers)."""

from __future__ import annotations

from glmserve.engine.engine import LLMEngine
from glmserve.protos import worker_pb2 as pb
from glmserve.worker.config import WorkerConfig

_ROLES = {"prefill": pb.WORKER_ROLE_PREFILL, "decode": pb.WORKER_ROLE_DECODE}


def load_report(engine: LLMEngine, cfg: WorkerConfig, lifecycle, request: pb.LoadRequest | None = None) -> pb.LoadReport:
    """Built on the engine thread (the pool and scheduler are not thread-safe). Carries the prefix-cache
    events since the ones the request says the router has applied."""
    s = engine.stats()
    queries = s["prefix_cache_queries"]
    request = request or pb.LoadRequest()
    delta = engine.pool.events.since(request.kv_events_epoch, request.kv_events_seq)
    return pb.LoadReport(
        role=_ROLES[cfg.role], model_name=cfg.served_model_name, max_model_len=engine.max_model_len,
        block_size=engine.pool.block_size, queued_tokens=s["num_queued_tokens"],
        running_requests=s["num_requests_running"], waiting_requests=s["num_requests_waiting"],
        kv_usage=s["kv_cache_usage_perc"], free_blocks=s["free_blocks"], total_blocks=s["total_blocks"],
        prefix_cache_hit_rate=(s["prefix_cache_hits"] / queries) if queries else 0.0,
        kv_events_epoch=delta.epoch, kv_events_seq=delta.seq, kv_events_reset=delta.reset,
        kv_stored_hashes=delta.stored, kv_removed_hashes=delta.removed,
        tensor_parallel_size=cfg.engine.tensor_parallel_size,
    )

