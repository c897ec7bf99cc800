"""GLM-4.5 / 4.6 / 4.7 (`glm4_moe`): GQA attention + the GLM MoE (DESIGN.md §4).

Flat token batches: every tensor is [T, ...] over the step's new tokens; the attention backend finds
each token's sequence and cached context through the ForwardContext. Module names mirror the Hugging
Face checkpoint so weights load by name (see weight_utils for the fused/stacked exceptions).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.attention.context import ForwardContext
from glmserve.engine.config import ModelConfig
from glmserve.engine.models.layers import Linear, RMSNorm, SwiGLUMLP
from glmserve.engine.models.moe import MoE
from glmserve.engine.models.mtp import MTPLayer, mtp_optional
from glmserve.engine.models.rope import RotaryEmbedding, rotate_neox
from glmserve.engine.models.weight_utils import load_named_weights


class Glm4MoeAttention(nn.Module):
    """q/k/v with bias (attention_bias), optional per-head RMSNorm on q and k BEFORE RoPE, partial NeoX RoPE
    on the first rotary_dim dims of each head, o_proj without bias."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend):
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = backend
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, self.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = Linear(self.num_heads * d, h, bias=False)
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


class Glm4MoeDecoderLayer(nn.Module):
    """Pre-norm attention + (dense SwiGLU or MoE). Layers past the decoder stack (MTP) are MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend):
        super().__init__()
        self.self_attn = Glm4MoeAttention(cfg, layer_idx, backend)
        dense = layer_idx < len(cfg.dense_layers) and cfg.dense_layers[layer_idx]
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size) if dense else MoE(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Glm4MoeModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Glm4MoeDecoderLayer(cfg, i, backend) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, interleaved=False, scaling=cfg.rope_scaling)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype, ctx: ForwardContext | None = None):
        """cos/sin [T, rotary_dim/2], once per step for all layers (max position from host data: no sync)."""
        max_pos = max(ctx.seq_lens_cpu) - 1 if ctx is not None and ctx.seq_lens_cpu else None
        return self.rotary.cos_sin(positions, dtype, max_pos)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype, ctx)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        return self.norm(x)


class Glm4MoeForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        self.model = Glm4MoeModel(cfg, backend)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.tie_weights()
        self.mtp: MTPLayer | None = None
        if cfg.num_nextn_predict_layers > 0:
            self.mtp = MTPLayer(cfg, backend, Glm4MoeDecoderLayer, self.model.rotary)

    def tie_weights(self) -> None:
        """Share lm_head with the embeddings when the config ties them (again after materialising from meta,
        which un-shares parameters)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [T, H] after the final norm."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors; returns the parameter names loaded. MTP weights are optional: without
        them `self.mtp` becomes None; without only its embed/head it shares the main model's."""
        optional = mtp_optional(self.cfg.tie_word_embeddings)
        loaded, _ = load_named_weights(self, weights, self.cfg, optional=optional)
        if self.mtp is not None:
            self.mtp = self.mtp.finish_loading(loaded, self.model.embed_tokens, self.lm_head)
        return loaded
