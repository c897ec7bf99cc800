"""How many KV blocks an engine takes from the GPU's free memory (plan_num_blocks), with the GPU's memory
query replaced: a budget that cannot hold one max_model_len sequence is refused at start, with the figures."""

from __future__ import annotations

import pytest
import torch

from glmserve.engine.config import CacheConfig
from glmserve.engine.kv_cache import KVCacheSpec
from glmserve.engine.model_runner import plan_num_blocks

GiB = 2**30
SPEC = KVCacheSpec(kind="gqa", block_size=16, num_kv_heads=2, head_dim=64)  # 8 KiB per block and layer in bf16


def _plan(monkeypatch, free: int, total: int, max_len: int, **cache) -> int:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return plan_num_blocks(SPEC, 4, torch.bfloat16, torch.device("cuda"), CacheConfig(**cache), max_len)


def test_the_budget_is_free_memory_above_the_reserved_share(monkeypatch):
    per_block = SPEC.bytes_per_block(torch.bfloat16) * 4
    blocks = _plan(monkeypatch, free=100 * GiB, total=140 * GiB, max_len=4096, gpu_memory_utilization=0.85)
    assert blocks == int((100 * GiB - 0.15 * 140 * GiB) // per_block)


def test_a_budget_short_of_one_sequence_is_refused_with_the_figures(monkeypatch):
    # What a second engine in one process saw on the H200: the first one holds its 85%.
    with pytest.raises(ValueError, match=r"max_model_len 131072 needs 8192.*--gpu-memory-utilization"):
        _plan(monkeypatch, free=int(0.15 * 140 * GiB) + 2**20, total=140 * GiB, max_len=131072)


def test_an_explicit_block_count_is_taken_as_given(monkeypatch):
    assert _plan(monkeypatch, free=0, total=140 * GiB, max_len=131072, num_blocks=7) == 7
