"""A prefill or decode worker as a tensor-parallel group: this process is the leader (gRPC, scheduler,
KV link), the other ranks are spawned and follow its steps (engine/parallel/rank_group.py). A group across
machines has its other nodes' ranks join through --dist-init-addr (worker/server.run_worker).

The KV link stays leader to leader: the prefill leader sends the whole KV and the decode leader copies what
lands to its followers (group_runner.share_kv). When every rank's cache holds the whole KV (the MLA latent,
one GQA KV head) that is the leader's own cache; when the ranks split the GQA KV heads the leader keeps a
full-head mirror for the link (engine/parallel/kv_mirror.py).
"""

from __future__ import annotations

import logging

import torch

from glmserve.engine.config import EngineConfig
from glmserve.engine.engine import LLMEngine
from glmserve.engine.parallel.kv_mirror import KVMirror
from glmserve.engine.parallel.parallel_state import ParallelState
from glmserve.engine.parallel.rank_group import RankGroup, start_rank_group
from glmserve.engine.parallel.sharding import kv_heads
from glmserve.worker.exit import exit_now

log = logging.getLogger(__name__)


def kv_head_slices(model_cfg, tp: int) -> list[tuple[int, int]] | None:
    """Each rank's (first KV head, count) when the ranks split the GQA KV heads; None when every rank
    holds the whole KV (MLA latent, or all KV heads on each rank)."""
    if model_cfg.is_mla or tp == 1:
        return None
    slices = [kv_heads(model_cfg.num_attention_heads, model_cfg.num_key_value_heads, ParallelState(rank=r, size=tp))
              for r in range(tp)]
    return None if all(n == model_cfg.num_key_value_heads for _, n in slices) else slices


def build_worker_engine(cfg: EngineConfig, role: str) -> tuple[LLMEngine, RankGroup | None]:
    """The leader's engine and its group (None for TP 1). A rank that dies ends this process (exit 1)."""
    def rank_died(reason: str) -> None:
        log.error("%s worker: %s; exiting", role, reason)
        exit_now(1)

    engine_cfg, group = start_rank_group(cfg, torch.get_num_threads(), on_rank_death=rank_died)
    try:
        engine = LLMEngine(engine_cfg)
    except BaseException:
        if group is not None:
            group.close()
        raise
    if group is not None:
        group.attach(engine.runner)
        slices = kv_head_slices(engine.model_config, cfg.tensor_parallel_size)
        if slices is not None:
            engine.runner.keep_full_kv(KVMirror(engine.runner.kv_caches, engine.model_config.num_key_value_heads,
                                                slices), gather_steps=role == "prefill")
    return engine, group
