"""GLM-4.5 / 4.6 / 4.7 (`glm4_moe`): GQA attention + the GLM MoE (docs/MODELS.md §2, §4).

Flat token batches: every tensor is [T, ...] over the step's new tokens; the attention backend finds
each token's sequence and cached context through the ForwardContext. Module names mirror the Hugging
Face checkpoint so weights load by name (see weight_utils for the fused/stacked exceptions).
"""

from __future__ import annotations

import torch
from torch import nn

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.attention.context import ForwardContext
from glmserve.engine.config import ModelConfig
from glmserve.engine.models.glm_base import GLMDecoderLayer, GLMForCausalLM
from glmserve.engine.models.layers import Linear, RMSNorm
from glmserve.engine.models.rope import RotaryEmbedding, rotate_neox
from glmserve.engine.parallel import parallel_state, sharding
from glmserve.engine.parallel.layers import RowParallelLinear


class Glm4MoeAttention(nn.Module):
    """q/k/v with bias (attention_bias), optional per-head RMSNorm on q and k BEFORE RoPE, partial NeoX RoPE
    on the first rotary_dim dims of each head, o_proj without bias."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend):
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = backend
        st = parallel_state.current()
        # This rank's heads (all of them on one rank); KV heads replicated when TP > num KV heads.
        _, self.num_heads = sharding.heads(cfg.num_attention_heads, st)
        _, self.num_kv_heads = sharding.kv_heads(cfg.num_attention_heads, cfg.num_key_value_heads, st)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, self.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(self.num_heads * d, h, False, st)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.use_qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.use_qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        q, k = rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)
        o = self.backend.gqa(self.layer_idx, q, k, v, ctx, self.scale)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class Glm4MoeDecoderLayer(GLMDecoderLayer):
    attention_cls = Glm4MoeAttention


class Glm4MoeForCausalLM(GLMForCausalLM):
    layer_cls = Glm4MoeDecoderLayer

    @staticmethod
    def make_rotary(cfg: ModelConfig) -> RotaryEmbedding:
        return RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, interleaved=False, scaling=cfg.rope_scaling)
