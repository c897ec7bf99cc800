"""Joining a tensor-parallel group: torch.distributed over TCP (gloo on CPU, NCCL on CUDA, the same code).

One process is one rank and one group per process, so the group is torch.distributed's default group.
The KV link's own 2-rank groups (kv_link.py) are built from their own stores and do not touch it.

Joining has two timeouts. Ranks first meet at rank 0's TCP store, for up to JOIN_TIMEOUT_S: on another
node they may start minutes later (an image still being pulled). Rank 0 meanwhile checks the ranks it
started itself, so a local rank that crashed on start fails the join at once. Only when every rank is there
is the process group built, under the group timeout (--dist-timeout) that also bounds every collective.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable

import torch

from glmserve.engine.config import EngineConfig
from glmserve.engine.parallel.parallel_state import ParallelConfig, ParallelState, set_current

JOIN_TIMEOUT_S = 600.0
_JOINED = "glmserve/joined"


def init_tensor_parallel(cfg: ParallelConfig, rank: int, init_addr: str, device: torch.device,
                         timeout_s: float = EngineConfig.dist_timeout_s, join_timeout_s: float = JOIN_TIMEOUT_S,
                         local_failure: Callable[[], str | None] = lambda: None) -> ParallelState:
    """Join the group of cfg.tensor_parallel_size ranks whose rank 0 listens on `init_addr` (HOST:PORT),
    make it the state models are built with, and return it. local_failure: a reason when a rank this
    process started has died (rank 0 stops waiting for it)."""
    import torch.distributed as dist

    if not 0 <= rank < cfg.tensor_parallel_size:
        raise ValueError(f"rank {rank} is outside a group of {cfg.tensor_parallel_size}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = _join(cfg.tensor_parallel_size, rank, init_addr, join_timeout_s, local_failure)
    dist.init_process_group(backend, store=dist.PrefixStore("group", store), rank=rank,
                            world_size=cfg.tensor_parallel_size, timeout=timedelta(seconds=timeout_s))
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    state = ParallelState(rank=rank, size=cfg.tensor_parallel_size, expert_parallel=cfg.enable_expert_parallel,
                          cpu_group=cpu_group)
    set_current(state)
    return state


def _join(size: int, rank: int, init_addr: str, join_timeout_s: float, local_failure: Callable[[], str | None]):
    """Meet every rank at rank 0's store; returns the store once all `size` have arrived."""
    import torch.distributed as dist

    host, _, port = init_addr.rpartition(":")
    store = dist.TCPStore(host, int(port), size, rank == 0, timedelta(seconds=join_timeout_s),
                          wait_for_workers=False)
    store.add(_JOINED, 1)
    deadline = time.monotonic() + join_timeout_s
    while store.add(_JOINED, 0) < size:  # add 0: read the count without blocking on a missing key
        failure = local_failure()
        if failure is not None:
            raise RuntimeError(f"{failure} before the group formed")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {store.add(_JOINED, 0)} of {size} tensor-parallel ranks joined at "
                               f"{init_addr} within {join_timeout_s:.0f} s")
        time.sleep(0.05)
    return store


def group_error_line(exc: BaseException) -> str:
    """The first sentence of a failed collective's error (gloo appends lines of advice)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0]


def shutdown_tensor_parallel() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
