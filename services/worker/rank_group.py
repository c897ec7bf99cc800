"""A prefill or decode worker as a tensor-parallel group: this process is the leader (gRPC, scheduler,
KV link), the other ranks are spawned and follow its steps (engine/parallel/rank_group.py).

The KV link stays leader to leader: the prefill leader sends its cache and the decode leader copies what
lands to its followers (group_runner.share_kv). That is exact only when every rank's cache holds the whole
KV: the MLA latent (GLM-4.7-Flash), or one GQA KV head. Layouts that split the KV heads are refused.
"""

from __future__ import annotations

import logging

import torch

from glmserve.engine.config import EngineConfig
from glmserve.engine.engine import LLMEngine
from glmserve.engine.parallel.parallel_state import ParallelState
from glmserve.engine.parallel.rank_group import RankGroup, start_rank_group
from glmserve.engine.parallel.sharding import kv_heads
from glmserve.worker.exit import exit_now

log = logging.getLogger(__name__)


def check_kv_whole_on_every_rank(cfg: EngineConfig, role: str) -> None:
    """Refuse (ValueError, one line) a TP worker whose ranks would each hold only part of the KV."""
    if cfg.tensor_parallel_size == 1:
        return
    if cfg.nnodes > 1:
        raise ValueError(f"{role} workers run their tensor-parallel group on one machine for now (--nnodes 1)")
    from glmserve.engine.loader import resolve_source

    model_cfg, _, _ = resolve_source(cfg.model, cfg.load_format)
    if model_cfg.is_mla:
        return
    st = ParallelState(rank=0, size=cfg.tensor_parallel_size)
    _, per_rank = kv_heads(model_cfg.num_attention_heads, model_cfg.num_key_value_heads, st)
    if per_rank != model_cfg.num_key_value_heads:
        raise ValueError(f"{role} workers with --tensor-parallel-size {cfg.tensor_parallel_size} need the whole KV "
                         f"on every rank (MLA models, or one KV head); this model's {model_cfg.num_key_value_heads} "
                         f"KV heads would be split across ranks, which the KV link cannot send yet")


def build_worker_engine(cfg: EngineConfig, role: str) -> tuple[LLMEngine, RankGroup | None]:
    """The leader's engine and its group (None for TP 1). A rank that dies ends this process (exit 1)."""
    check_kv_whole_on_every_rank(cfg, role)

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
    return engine, group
