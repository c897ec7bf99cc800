"""A prefill or decode worker as a tensor-parallel group: this process is the leader (gRPC, scheduler,
KV link control), the other ranks are spawned and follow its steps (engine/parallel/rank_group.py). A group
across machines has its other nodes' ranks join through --dist-init-addr (worker/server.run_worker).

Every rank has its own KV link endpoint, started by the prefill or decode service (engine/parallel/kv_setup.py):
prefill ranks send the KV heads they hold straight to the decode ranks holding them (engine/parallel/kv_plan.py).
"""

from __future__ import annotations

import logging

import torch

from glmserve.engine.config import EngineConfig
from glmserve.engine.engine import LLMEngine
from glmserve.engine.parallel.rank_group import RankGroup, start_rank_group
from glmserve.worker.exit import exit_now

log = logging.getLogger(__name__)


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
    return engine, group
