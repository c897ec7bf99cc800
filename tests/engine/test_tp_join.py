"""Joining a tensor-parallel group: rank 0 stops waiting at once when a rank it started has died, and
after the join timeout otherwise, each with a line that says why (no hang, no bare store error)."""

from __future__ import annotations

import time

import pytest
import torch

from glmserve.engine.parallel.distributed import init_tensor_parallel
from glmserve.engine.parallel.parallel_state import ParallelConfig
from glmserve.local_ports import free_port


def test_a_local_rank_that_died_fails_the_join_at_once():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 .* exited with code 1 before the group formed"):
        init_tensor_parallel(ParallelConfig(2), 0, f"127.0.0.1:{free_port()}", torch.device("cpu"),
                             local_failure=lambda: "tensor-parallel rank 1 (pid 7) exited with code 1")
    assert time.monotonic() - t0 < 5.0  # not the 600 s join timeout


def test_ranks_that_never_come_fail_the_join_after_its_timeout():
    addr = f"127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match=f"only 1 of 3 tensor-parallel ranks joined at {addr} within 1 s"):
        init_tensor_parallel(ParallelConfig(3), 0, addr, torch.device("cpu"), join_timeout_s=1.0)
