"""Joining a tensor-parallel group: torch.distributed over TCP (gloo on CPU, NCCL on CUDA, the same code).

One process is one rank and one group per process, so the group is torch.distributed's default group.
The KV link's own 2-rank groups (kv_link.py) are built from their own stores and do not touch it.
"""

from __future__ import annotations

from datetime import timedelta

import torch

from glmserve.engine.parallel.parallel_state import ParallelConfig, ParallelState, set_current

# How long a collective may wait for a peer. A dead peer usually fails the collective at once (its socket
# closes); this bounds the case where a peer hangs without dying.
DEFAULT_TIMEOUT_S = 60.0


def init_tensor_parallel(cfg: ParallelConfig, rank: int, init_addr: str, device: torch.device,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelState:
    """Join the group of cfg.tensor_parallel_size ranks whose rank 0 listens on `init_addr` (HOST:PORT),
    make it the state models are built with, and return it."""
    import torch.distributed as dist

    if not 0 <= rank < cfg.tensor_parallel_size:
        raise ValueError(f"rank {rank} is outside a group of {cfg.tensor_parallel_size}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://{init_addr}", rank=rank,
                            world_size=cfg.tensor_parallel_size, timeout=timedelta(seconds=timeout_s))
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    state = ParallelState(rank=rank, size=cfg.tensor_parallel_size, expert_parallel=cfg.enable_expert_parallel,
                          cpu_group=cpu_group)
    set_current(state)
    return state


def shutdown_tensor_parallel() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
