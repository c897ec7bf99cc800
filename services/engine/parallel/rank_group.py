"""Starting a tensor-parallel group on this machine: the calling process becomes rank 0 (the leader, which
builds the LLMEngine), ranks 1..TP-1 are spawned processes that build the same engine for their shard
and run the leader's steps (group_runner.follower_loop).

A rank that dies takes the group down: the survivors' next collective fails, and a watcher thread on the
leader notices a dead follower within a second even when idle, logs which rank and how it ended, and
calls `on_rank_death` (`glmserve serve` exits, so its supervisor or pod restarts it). The same thread
sends an idle group an empty step every few seconds: the followers' wait for the next step stays inside
the group timeout, and a rank on another node that died meanwhile fails that message. Followers exit
when the leader goes (their collective fails; they are also daemon processes).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from dataclasses import replace
from typing import Callable

import torch

from glmserve.engine.config import EngineConfig
from glmserve.engine.dtypes import resolve_device
from glmserve.engine.engine import LLMEngine
from glmserve.engine.parallel.group_runner import FollowerNode, follower_loop
from glmserve.engine.parallel.distributed import group_error_line, init_tensor_parallel, shutdown_tensor_parallel
from glmserve.engine.parallel.parallel_state import ParallelConfig, ParallelState, set_current, SINGLE

logger = logging.getLogger(__name__)
_WATCH_INTERVAL_S = 0.5
# An idle leader messages its followers this often (a quarter of the group timeout when that is shorter):
# inside the timeout their wait for the next step runs under, and often enough that a follower on another
# node that died while the group was idle is noticed within seconds (its closed connection fails the message).
KEEPALIVE_S = 5.0


def rank_device(device: torch.device, rank: int) -> str:
    """One accelerator per rank: cuda -> cuda:rank; CPU ranks share the CPU."""
    return f"cuda:{rank}" if device.type == "cuda" else str(device)


def _follower_main(rank: int, cfg: EngineConfig, addr: str, torch_threads: int | None) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(levelname)s %(message)s")
    if torch_threads:
        torch.set_num_threads(torch_threads)

    pcfg = ParallelConfig(cfg.tensor_parallel_size, cfg.enable_expert_parallel)
    try:
        state = init_tensor_parallel(pcfg, rank, addr, torch.device(cfg.device), cfg.dist_timeout_s)
        engine = LLMEngine(cfg)
        follower_loop(engine.runner, state, FollowerNode(cfg.node_rank, addr))
    except Exception as exc:  # the leader went away (or never came): one line, no traceback
        logger.error("tensor-parallel rank %d stops: %s", rank, str(exc).splitlines()[0] if str(exc) else exc)
        raise SystemExit(1) from None
    shutdown_tensor_parallel()


def _spawned_follower_main(rank: int, cfg: EngineConfig, addr: str, torch_threads: int | None) -> None:
    """A rank this process spawned. Ctrl-C / SIGTERM reach the whole process group: the ranks leave them to
    the leader, which stops them after its drain (they also exit when it goes)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _follower_main(rank, cfg, addr, torch_threads)


def check_shardable(cfg: EngineConfig) -> None:
    """Refuse (ValueError, one line) a model whose heads, experts or MLPs do not split into
    cfg.tensor_parallel_size ranks, before any process starts: the model is built on the meta device."""
    from glmserve.engine.attention.torch_backend import TorchAttentionBackend
    from glmserve.engine.loader import resolve_source
    from glmserve.engine.models.registry import model_class
    from glmserve.engine.parallel.parallel_state import building_with

    model_cfg, _, _ = resolve_source(cfg.model, cfg.load_format)
    if model_cfg.vision is not None:  # the step messages carry no images nor M-RoPE positions yet
        raise ValueError(f"tensor parallelism does not support the vision models ({model_cfg.arch}) yet")
    state = ParallelState(rank=0, size=cfg.tensor_parallel_size, expert_parallel=cfg.enable_expert_parallel)
    with building_with(state), torch.device("meta"):
        model_class(model_cfg.arch)(model_cfg, TorchAttentionBackend())


def _first_dead(procs: list, first_rank: int) -> str | None:
    """A line naming the first of these rank processes that has exited, if any."""
    for rank, p in enumerate(procs, start=first_rank):
        if not p.is_alive():
            return f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
    return None


class RankGroup:
    def __init__(self, procs: list, state: ParallelState, on_rank_death: Callable[[str], None] | None,
                 keepalive_s: float = KEEPALIVE_S):
        self.procs = procs
        self.keepalive_s = keepalive_s
        self.state = state
        self.on_rank_death = on_rank_death
        self.broken: str | None = None
        self._closing = False
        self._runner = None  # the leader's runner, once attached: the watcher keeps the idle group alive
        self._watcher = threading.Thread(target=self._watch, name="tp-rank-watcher", daemon=True)
        self._watcher.start()

    def _dead_rank(self) -> str | None:
        return _first_dead(self.procs, first_rank=1)

    def _fail(self, reason: str) -> None:
        if self.broken is not None or self._closing:
            return
        self.broken = reason
        logger.error("%s: the group of %d ranks cannot run; stopping", reason, self.state.size)
        if self.on_rank_death is not None:
            self.on_rank_death(reason)

    def _watch(self) -> None:
        while not self._closing and self.broken is None:
            reason = self._dead_rank()
            if reason is None and self._runner is not None:
                try:
                    self._runner.keep_alive(self.keepalive_s)
                except RuntimeError as exc:
                    first = group_error_line(exc)
                    reason = self._dead_rank() or f"the tensor-parallel group broke while idle ({first})"
            if reason is not None:
                self._fail(reason)
                return
            self._watcher_sleep()

    def attach(self, runner) -> None:
        """The leader's runner reports a step that failed because the group broke, like the watcher does,
        and from now on the watcher keeps the idle group alive through it."""
        if hasattr(runner, "on_broken"):
            runner.on_broken = self._broken_during_step
        if hasattr(runner, "keep_alive"):
            self._runner = runner

    def _broken_during_step(self, reason: str) -> None:
        # A local rank's death is the likelier and clearer cause: name it when there is one.
        time.sleep(_WATCH_INTERVAL_S)  # its exit may take a moment to be visible
        self._fail(self._dead_rank() or reason)

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


def check_layout(cfg: EngineConfig) -> None:
    """Refuse (ValueError, one line) a group layout that cannot start."""
    tp, nnodes = cfg.tensor_parallel_size, cfg.nnodes
    if nnodes < 1 or tp % nnodes:
        raise ValueError(f"--nnodes {nnodes} must divide --tensor-parallel-size {tp}")
    if not 0 <= cfg.node_rank < nnodes:
        raise ValueError(f"--node-rank {cfg.node_rank} is outside 0..{nnodes - 1}")
    if nnodes > 1 and not cfg.dist_init_addr:
        raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address, the same on every node)")
    if cfg.with_mtp:
        raise ValueError("MTP speculative decoding does not support tensor parallelism yet")


def _spawn(cfg: EngineConfig, device: torch.device, ranks: range, first: int, addr: str,
           torch_threads: int | None) -> list:
    ctx = mp.get_context("spawn")
    procs = []
    for rank in ranks:
        rank_cfg = replace(cfg, device=rank_device(device, rank - first), show_progress=False)
        p = ctx.Process(target=_spawned_follower_main, args=(rank, rank_cfg, addr, torch_threads), daemon=True,
                        name=f"glmserve-tp-rank{rank}")
        p.start()
        procs.append(p)
    return procs


def _local_ranks(cfg: EngineConfig) -> tuple[int, int, torch.device]:
    """(first rank on this node, ranks per node, device type) after checking the node can hold them."""
    check_layout(cfg)
    check_shardable(cfg)
    per_node = cfg.tensor_parallel_size // cfg.nnodes
    device = resolve_device(cfg.device)
    if device.type == "cuda" and torch.cuda.device_count() < per_node:
        raise ValueError(f"{per_node} ranks per node need as many GPUs; this machine has {torch.cuda.device_count()}")
    return cfg.node_rank * per_node, per_node, device


def split_threads(device: torch.device, per_node: int, threads: int | None) -> int | None:
    """CPU ranks share the machine's cores: at most cores / ranks torch threads each (this process's
    too), so N ranks never oversubscribe them. GPU ranks keep what they were given."""
    if device.type != "cpu":
        return threads
    share = max(1, (os.cpu_count() or 1) // per_node)
    threads = min(threads or torch.get_num_threads(), share)
    torch.set_num_threads(threads)
    return threads


def start_rank_group(cfg: EngineConfig, torch_threads: int | None = None,
                     on_rank_death: Callable[[str], None] | None = None) -> tuple[EngineConfig, RankGroup | None]:
    """For TP > 1 on node 0: spawn this node's other ranks and join the group as rank 0. Returns the config
    the leader's engine is built with (its device pinned to rank 0's) and the group; (cfg, None) for a
    single rank. Call `RankGroup.attach(engine.runner)` once the engine exists."""
    if cfg.tensor_parallel_size == 1:
        return cfg, None
    if cfg.node_rank != 0:
        raise ValueError("only node 0 hosts the leader; other nodes run run_follower_node")
    from glmserve.local_ports import free_port

    first, per_node, device = _local_ranks(cfg)
    torch_threads = split_threads(device, per_node, torch_threads)
    addr = cfg.dist_init_addr or f"127.0.0.1:{free_port()}"
    procs = _spawn(cfg, device, range(1, per_node), 0, addr, torch_threads)
    leader_cfg = replace(cfg, device=rank_device(device, 0))
    pcfg = ParallelConfig(cfg.tensor_parallel_size, cfg.enable_expert_parallel)
    try:
        state = init_tensor_parallel(pcfg, 0, addr, torch.device(leader_cfg.device), cfg.dist_timeout_s,
                                     local_failure=lambda: _first_dead(procs, first_rank=1))
    except Exception:
        for p in procs:
            p.kill()
        raise
    return leader_cfg, RankGroup(procs, state, on_rank_death, keepalive_s=min(KEEPALIVE_S, cfg.dist_timeout_s / 4))


def run_follower_node(cfg: EngineConfig, torch_threads: int | None = None) -> int:
    """A node other than 0: this process is the node's first rank, spawned processes its others. Returns
    0 when the leader stops the group, 1 when the group breaks (a line names why)."""
    first, per_node, device = _local_ranks(cfg)
    torch_threads = split_threads(device, per_node, torch_threads)
    logger.info("node %d of %d: ranks %d..%d follow the leader at %s", cfg.node_rank, cfg.nnodes, first,
                first + per_node - 1, cfg.dist_init_addr)
    procs = _spawn(cfg, device, range(first + 1, first + per_node), first, cfg.dist_init_addr, torch_threads)
    try:
        _follower_main(first, replace(cfg, device=rank_device(device, 0)), cfg.dist_init_addr, torch_threads)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    return code
