"""Starting a tensor-parallel group on this machine: the calling process becomes rank 0 (the leader, which
builds the LLMEngine), ranks 1..TP-1 are spawned processes that build the same engine for their shard
and run the leader's steps (group_runner.follower_loop).

A rank that dies takes the group down: the survivors' next collective fails, and a watcher thread on the
leader notices a dead follower within a second even when idle, logs which rank and how it ended, and
calls `on_rank_death` (`glmserve serve` exits, so its supervisor or pod restarts it). Followers exit
when the leader goes (their collective fails; they are also daemon processes).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from dataclasses import replace
from typing import Callable

import torch

from glmserve.engine.config import EngineConfig
from glmserve.engine.dtypes import resolve_device
from glmserve.engine.parallel.distributed import init_tensor_parallel, shutdown_tensor_parallel
from glmserve.engine.parallel.parallel_state import ParallelConfig, ParallelState, set_current, SINGLE

logger = logging.getLogger(__name__)
_WATCH_INTERVAL_S = 0.5


def rank_device(device: torch.device, rank: int) -> str:
    """One accelerator per rank: cuda -> cuda:rank; CPU ranks share the CPU."""
    return f"cuda:{rank}" if device.type == "cuda" else str(device)


def _follower_main(rank: int, cfg: EngineConfig, addr: str, torch_threads: int | None) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(levelname)s %(message)s")
    if torch_threads:
        torch.set_num_threads(torch_threads)
    from glmserve.engine.engine import LLMEngine
    from glmserve.engine.parallel.group_runner import follower_loop

    pcfg = ParallelConfig(cfg.tensor_parallel_size, cfg.enable_expert_parallel)
    try:
        state = init_tensor_parallel(pcfg, rank, addr, torch.device(cfg.device))
        engine = LLMEngine(cfg)
        follower_loop(engine.runner, state)
    except Exception as exc:  # the leader went away (or never came): one line, no traceback
        logger.error("tensor-parallel rank %d stops: %s", rank, str(exc).splitlines()[0] if str(exc) else exc)
        raise SystemExit(1) from None
    shutdown_tensor_parallel()


def check_shardable(cfg: EngineConfig) -> None:
    """Refuse (ValueError, one line) a model whose heads, experts or MLPs do not split into
    cfg.tensor_parallel_size ranks, before any process starts: the model is built on the meta device."""
    from glmserve.engine.attention.torch_backend import TorchAttentionBackend
    from glmserve.engine.loader import resolve_source
    from glmserve.engine.models.registry import model_class
    from glmserve.engine.parallel.parallel_state import building_with

    model_cfg, _, _ = resolve_source(cfg.model, cfg.load_format)
    state = ParallelState(rank=0, size=cfg.tensor_parallel_size, expert_parallel=cfg.enable_expert_parallel)
    with building_with(state), torch.device("meta"):
        model_class(model_cfg.arch)(model_cfg, TorchAttentionBackend())


class RankGroup:
    def __init__(self, procs: list, state: ParallelState, on_rank_death: Callable[[str], None] | None):
        self.procs = procs
        self.state = state
        self.on_rank_death = on_rank_death
        self.broken: str | None = None
        self._closing = False
        self._watcher = threading.Thread(target=self._watch, name="tp-rank-watcher", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._closing:
            for rank, p in enumerate(self.procs, start=1):
                if not p.is_alive() and not self._closing:
                    self.broken = f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
                    logger.error("%s: the group of %d ranks cannot run; stopping", self.broken, len(self.procs) + 1)
                    if self.on_rank_death is not None:
                        self.on_rank_death(self.broken)
                    return
            self._watcher_sleep()

    def _watcher_sleep(self) -> None:
        threading.Event().wait(_WATCH_INTERVAL_S)

    def close(self, runner=None) -> None:
        """Stop the followers (runner: the leader's LeaderRunner, which tells them) and leave the group."""
        self._closing = True
        if runner is not None and hasattr(runner, "close") and self.broken is None:
            runner.close()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        shutdown_tensor_parallel()
        set_current(SINGLE)


def start_rank_group(cfg: EngineConfig, torch_threads: int | None = None,
                     on_rank_death: Callable[[str], None] | None = None) -> tuple[EngineConfig, RankGroup | None]:
    """For TP > 1: spawn ranks 1.. and join the group as rank 0. Returns the config the leader's engine is
    built with (its device pinned to rank 0's) and the group; (cfg, None) for a single rank."""
    if cfg.tensor_parallel_size == 1:
        return cfg, None
    if cfg.with_mtp:
        raise ValueError("MTP speculative decoding does not support tensor parallelism yet")
    from glmserve.local_ports import free_port

    check_shardable(cfg)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and torch.cuda.device_count() < cfg.tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {cfg.tensor_parallel_size} needs as many GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    addr = f"127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, cfg.tensor_parallel_size):
        rank_cfg = replace(cfg, device=rank_device(device, rank), show_progress=False)
        p = ctx.Process(target=_follower_main, args=(rank, rank_cfg, addr, torch_threads), daemon=True,
                        name=f"glmserve-tp-rank{rank}")
        p.start()
        procs.append(p)
    leader_cfg = replace(cfg, device=rank_device(device, 0))
    pcfg = ParallelConfig(cfg.tensor_parallel_size, cfg.enable_expert_parallel)
    state = init_tensor_parallel(pcfg, 0, addr, torch.device(leader_cfg.device))
    return leader_cfg, RankGroup(procs, state, on_rank_death)
