"""The attention backend interface. Models call it; backends (torch reference, FlashInfer, FA3,
Triton) implement it. Models never branch on the backend.

Two attention kinds:
- GQA (glm4_moe): the cache of a layer is `[num_blocks, 2, block_size, num_kv_heads, head_dim]`
  (FlashInfer's NHD paged layout; index 0 = K, 1 = V).
- MLA (glm4_moe_lite): the cache of a layer is `[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`
  holding the normalised latent followed by the RoPE'd shared key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from glmserve.engine.attention.context import ForwardContext


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of one layer's cache block, independent of the number of blocks."""

    kind: str  # "gqa" | "mla"
    block_size: int
    num_kv_heads: int = 0
    head_dim: int = 0
    latent_dim: int = 0  # kv_lora_rank + qk_rope_head_dim for MLA

    def layer_shape(self, num_blocks: int) -> tuple[int, ...]:
        if self.kind == "gqa":
            return (num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim)
        return (num_blocks, self.block_size, self.latent_dim)

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        n = 1
        for d in self.layer_shape(1):
            n *= d
        return n * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class MLAWeights:
    """kv_b_proj split per head, for the absorbed path: k_nope = latent @ w_uk^T, v = latent @ w_uv^T."""

    w_uk: torch.Tensor  # [H, qk_nope_head_dim, kv_lora_rank]
    w_uv: torch.Tensor  # [H, v_head_dim, kv_lora_rank]


class AttentionBackend(ABC):
    name: str = "abstract"
    # True when decode-only steps through gqa()/mla() may be captured in a CUDA graph and replayed
    # (engine/cuda_graphs.py): no host syncs and no host-side planning whose result depends on the step;
    # every per-step value (positions, slots, seq_lens, block tables) read from the ctx device tensors,
    # whose addresses stay fixed across replays. Host lengths (ctx.seq_lens_cpu) may only size launches
    # (split-KV): at capture they hold an upper bound, not the real lengths. prepare() runs at capture only.
    supports_cuda_graphs: bool = False

    def prepare(self, ctx: ForwardContext) -> None:
        """Once per step, before the first layer (plan kernels, build masks)."""

    @abstractmethod
    def gqa(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D], RoPE applied
        k: torch.Tensor,  # [T, Hkv, D], RoPE applied
        v: torch.Tensor,  # [T, Hkv, D]
        ctx: ForwardContext,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Store k/v at ctx.slot_mapping, then causal attention of each query over its sequence."""

    @abstractmethod
    def mla(
        self,
        layer: int,
        q_nope: torch.Tensor,  # [T, H, qk_nope_head_dim]
        q_rope: torch.Tensor,  # [T, H, qk_rope_head_dim], RoPE applied
        latent: torch.Tensor,  # [T, kv_lora_rank], normalised
        k_rope: torch.Tensor,  # [T, qk_rope_head_dim], RoPE applied
        weights: MLAWeights,
        ctx: ForwardContext,
        scale: float,
    ) -> torch.Tensor:  # [T, H, v_head_dim]
        """Store [latent | k_rope] at ctx.slot_mapping, then causal MLA attention."""


def store_slots(cache_flat: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """Write values [T, ...] to rows slot_mapping of cache_flat [num_slots, ...], skipping slot -1."""
    if slot_mapping.numel() == 0:
        return
    valid = slot_mapping >= 0
    if bool(valid.all()):
        cache_flat.index_copy_(0, slot_mapping, values.to(cache_flat.dtype))
    else:
        cache_flat.index_copy_(0, slot_mapping[valid], values[valid].to(cache_flat.dtype))
