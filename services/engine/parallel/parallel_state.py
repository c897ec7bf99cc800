"""Which shard of the model this process holds: tensor-parallel rank, group size, expert-parallel flag.

One process is one rank. Models read the current state when they are BUILT (like `torch.device(...)` as a
context): each module keeps the `ParallelState` it was built with and uses it in forward, so a process can
build a single-rank reference model next to its sharded one (the parity tests do). The default is a
single rank, so code that never sets a state runs exactly as before.

The collectives go through torch.distributed on `group` (gloo on CPU, NCCL on GPU: the same calls).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass(frozen=True)
class ParallelConfig:
    """What the user asked for (CLI flags / LLM kwargs): built once, passed down."""

    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


@dataclass(frozen=True)
class ParallelState:
    """This rank's place in its tensor-parallel group. group None = the default process group; cpu_group
    carries the leader's step messages (gloo, also when the tensors go over NCCL)."""

    rank: int = 0
    size: int = 1
    expert_parallel: bool = False
    group: Any = None
    cpu_group: Any = None

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the group, in place (x is returned for chaining)."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def min_over_ranks(self, n: int) -> int:
        """The smallest n of all ranks (e.g. KV blocks: every rank must hold the leader's block ids)."""
        if self.size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation of every rank's x along the last dim (rank order)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = ParallelState()
_current: ParallelState = SINGLE


def current() -> ParallelState:
    """The state models built now take (SINGLE unless set)."""
    return _current


def set_current(state: ParallelState) -> None:
    """Set once per rank process at start-up (after torch.distributed is initialised)."""
    global _current
    _current = state


@contextmanager
def building_with(state: ParallelState) -> Iterator[ParallelState]:
    """Build models for `state` inside the block, then restore the previous state."""
    global _current
    previous, _current = _current, state
    try:
        yield state
    finally:
        _current = previous


def divide(n: int, size: int, what: str) -> int:
    """n / size, refusing with a clear message when it does not divide."""
    if n % size:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {size}")
    return n // size
