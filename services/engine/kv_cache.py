"""Allocation of the per-layer paged KV cache tensors."""

from __future__ import annotations

import torch

from glmserve.engine.attention.backend import KVCacheSpec
from glmserve.engine.config import ModelConfig
from glmserve.engine.parallel import parallel_state, sharding


def kv_cache_spec(cfg: ModelConfig, block_size: int) -> KVCacheSpec:
    """This rank's cache: the whole MLA latent on every rank, the GQA KV heads this rank holds."""
    if cfg.is_mla:
        return KVCacheSpec(kind="mla", block_size=block_size, latent_dim=cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    _, kv_heads = sharding.kv_heads(cfg.num_attention_heads, cfg.num_key_value_heads, parallel_state.current())
    return KVCacheSpec(kind="gqa", block_size=block_size, num_kv_heads=kv_heads, head_dim=cfg.head_dim)


def allocate_kv_caches(
    spec: KVCacheSpec, num_layers: int, num_blocks: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    return [torch.zeros(spec.layer_shape(num_blocks), dtype=dtype, device=device) for _ in range(num_layers)]
