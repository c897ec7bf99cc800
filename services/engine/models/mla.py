"""Multi-head latent attention (MLA) of GLM-4.7-Flash (docs/MODELS.md §3).

Per token the model computes a compressed KV latent (`kv_lora_rank` values, RMS-normalised) and one
RoPE'd key slice shared by all heads (`qk_rope_head_dim` values); only these two go to the cache. The
per-head keys and values are never materialised here: the backend absorbs `kv_b_proj` (W_UK into the
query, W_UV after attending over the latent), so the model hands it `MLAWeights`, views of `kv_b_proj`.
"""

from __future__ import annotations

import torch
from torch import nn

from glmserve.engine.attention.backend import AttentionBackend, MLAWeights
from glmserve.engine.attention.context import ForwardContext
from glmserve.engine.config import ModelConfig
from glmserve.engine.models.layers import Linear, RMSNorm
from glmserve.engine.models.rope import rotate_interleaved, rotate_neox
from glmserve.engine.parallel import parallel_state, sharding
from glmserve.engine.parallel.layers import RowParallelLinear

# transformers 5.23 builds q_a_layernorm / kv_a_layernorm with its RMSNorm default eps (1e-6), not
# config.rms_norm_eps; we match the reference.
LATENT_NORM_EPS = 1e-6


class MLAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend):
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = backend
        st = parallel_state.current()
        _, self.num_heads = sharding.heads(cfg.num_attention_heads, st)  # the latent stays whole on every rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.rope_interleave = cfg.rope_interleave
        self.scale = cfg.attention_scale
        h, qk_dim = cfg.hidden_size, cfg.qk_head_dim
        # GLM-4.7-Flash compresses q through a rank-q_lora_rank bottleneck; q_lora_rank None = plain q_proj.
        self.q_lora = cfg.q_lora_rank is not None
        if not self.q_lora:
            self.q_proj = Linear(h, self.num_heads * qk_dim)
        else:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.num_heads * qk_dim)
        self.kv_a_proj_with_mqa = Linear(h, self.rank + self.rope_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.rank, self.num_heads * (self.nope_dim + self.v_dim))
        self.o_proj = RowParallelLinear(self.num_heads * self.v_dim, h, cfg.attention_bias, st)
        self._mla_weights: MLAWeights | None = None
        self._mla_weights_src: tuple[int, torch.dtype] | None = None

    @property
    def mla_weights(self) -> MLAWeights:
        """kv_b_proj split per head as zero-copy views, built once; rebuilt only if the weight tensor was
        replaced (loading, `.to(dtype/device)`), which a pointer compare per step detects."""
        w = self.kv_b_proj.weight
        key = (w.data_ptr(), w.dtype)
        if self._mla_weights is None or self._mla_weights_src != key:
            per_head = w.view(self.num_heads, self.nope_dim + self.v_dim, self.rank)
            self._mla_weights = MLAWeights(w_uk=per_head[:, : self.nope_dim], w_uv=per_head[:, self.nope_dim :])
            self._mla_weights_src = key
        return self._mla_weights

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q_nope [T,H,nope], q_rope [T,H,rope] RoPE'd, latent [T,R] normalised, k_rope [T,rope] RoPE'd).

        cos/sin [T, rope/2] come from the model's RotaryEmbedding, computed once per step for all layers.
        """
        t = x.shape[0]
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_rope = q.view(t, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        rope = rotate_interleaved if self.rope_interleave else rotate_neox
        q_rope = rope(q_rope, cos.unsqueeze(1), sin.unsqueeze(1))
        k_rope = rope(k_rope, cos, sin)
        return q_nope, q_rope, latent, k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q_nope, q_rope, latent, k_rope = self.project(x, cos, sin)
        out = self.backend.mla(self.layer_idx, q_nope, q_rope, latent, k_rope, self.mla_weights, ctx, self.scale)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.v_dim))
