"""Allocation of the per-layer paged KV cache tensors."""

from __future__ import annotations

import torch

from glmserve.engine.attention.backend import KVCacheSpec
from glmserve.engine.config import ModelConfig


def kv_cache_spec(cfg: ModelConfig, block_size: int) -> KVCacheSpec:
    if cfg.is_mla:
        return KVCacheSpec(kind="mla", block_size=block_size, latent_dim=cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return KVCacheSpec(kind="gqa", block_size=block_size, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim)


def allocate_kv_caches(
    spec: KVCacheSpec, num_layers: int, num_blocks: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    return [torch.zeros(spec.layer_shape(num_blocks), dtype=dtype, device=device) for _ in range(num_layers)]
