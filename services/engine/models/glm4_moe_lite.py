"""GLM-4.7-Flash (`glm4_moe_lite`): MLA attention + the GLM MoE (docs/MODELS.md §3, §4).

Module names mirror the Hugging Face checkpoint (`model.layers.N.self_attn.q_a_proj`, ...), so most
weights load by name; weight_utils maps the fused/stacked exceptions (gate/up, experts, router, MTP).
The MTP layer (index num_hidden_layers) is mtp.py's container around this file's decoder layer.
"""

from __future__ import annotations

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.config import ModelConfig
from glmserve.engine.models.glm_base import GLMDecoderLayer, GLMForCausalLM
from glmserve.engine.models.mla import MLAAttention
from glmserve.engine.models.rope import RotaryEmbedding


class Glm4MoeLiteDecoderLayer(GLMDecoderLayer):
    attention_cls = MLAAttention


class Glm4MoeLiteForCausalLM(GLMForCausalLM):
    layer_cls = Glm4MoeLiteDecoderLayer

    @staticmethod
    def make_rotary(cfg: ModelConfig) -> RotaryEmbedding:
        # MLA rotates only the qk_rope_head_dim slices (each head's q and the shared key).
        return RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, interleaved=cfg.rope_interleave,
                               scaling=cfg.rope_scaling)

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, with_mtp: bool = False):
        if not cfg.is_mla:
            raise ValueError(f"Glm4MoeLiteForCausalLM needs a glm4_moe_lite config, got arch={cfg.arch!r}")
        super().__init__(cfg, backend, with_mtp)
