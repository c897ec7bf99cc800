"""What both GLM architectures share: the decoder layer around an attention module, the model stack
with one RoPE table per step, and the causal-LM head with optional MTP layer and weight loading.

An architecture names its attention class and its RoPE; module names mirror the Hugging Face checkpoint
(`model.layers.N.self_attn...`) so weights load by name (see weight_utils for the exceptions).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.attention.context import ForwardContext
from glmserve.engine.config import ModelConfig
from glmserve.engine.models.layers import Linear, RMSNorm
from glmserve.engine.models.moe import MoE
from glmserve.engine.models.mtp import MTPLayer, mtp_optional
from glmserve.engine.models.rope import RotaryEmbedding
from glmserve.engine.models.weight_utils import hf_weight_target, hf_weight_target_without_mtp, load_named_weights
from glmserve.engine.parallel import parallel_state
from glmserve.engine.parallel.layers import ParallelSwiGLUMLP, VocabParallelEmbedding, gather_logits


class GLMDecoderLayer(nn.Module):
    """Pre-norm attention + (dense SwiGLU or MoE). Layers past the decoder stack (MTP) are MoE."""

    attention_cls: type[nn.Module]

    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend):
        super().__init__()
        self.self_attn = self.attention_cls(cfg, layer_idx, backend)
        dense = layer_idx < len(cfg.dense_layers) and cfg.dense_layers[layer_idx]
        self.mlp = ParallelSwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, parallel_state.current()) if dense \
            else MoE(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class GLMModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, layer_cls: type[GLMDecoderLayer],
                 rotary: RotaryEmbedding):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel_state.current())
        self.layers = nn.ModuleList(layer_cls(cfg, i, backend) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = rotary

    def rope(self, positions: torch.Tensor, dtype: torch.dtype, ctx: ForwardContext | None = None):
        """cos/sin of every new token, once per step for all layers (max position from host data: no sync)."""
        max_pos = max(ctx.seq_lens_cpu) - 1 if ctx is not None and ctx.seq_lens_cpu else None
        return self.rotary.cos_sin(positions, dtype, max_pos)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype, ctx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, ctx)
            ctx.layer_done(i)  # this layer's new KV is in the cache: a KV sender may ship it now
        return self.norm(x)


class GLMForCausalLM(nn.Module):
    layer_cls: type[GLMDecoderLayer]

    @staticmethod
    def make_rotary(cfg: ModelConfig) -> RotaryEmbedding:
        raise NotImplementedError

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, with_mtp: bool = False):
        """with_mtp: build the checkpoint's MTP layer (only speculative decoding uses it; on GLM-4.7 it is
        ~7.5 GB of bf16 taken from the KV cache). Without it the checkpoint's MTP tensors are skipped."""
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        self.parallel = parallel_state.current()
        if with_mtp and self.parallel.is_parallel:
            raise ValueError("MTP speculative decoding does not support tensor parallelism yet")
        self.model = GLMModel(cfg, backend, self.layer_cls, self.make_rotary(cfg))
        # Vocabulary-parallel head: this rank's slice of the vocabulary (gather_logits joins them).
        self.lm_head = Linear(cfg.hidden_size, self.model.embed_tokens.weight.shape[0])
        self.tie_weights()
        self.mtp: MTPLayer | None = None
        if with_mtp and cfg.num_nextn_predict_layers > 0:
            self.mtp = MTPLayer(cfg, backend, self.layer_cls, self.model.rotary)

    def tie_weights(self) -> None:
        """Share lm_head with the embeddings when the config ties them (again after materialising from meta,
        which un-shares parameters)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [T, H] after the final norm, for the flat batch of new tokens in `ctx`."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return gather_logits(self.lm_head(hidden).float(), self.cfg.vocab_size, self.parallel)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named checkpoint tensors; returns the parameter names loaded. Unknown names, wrong shapes
        and missing weights raise WeightLoadError. MTP weights are optional: without them `self.mtp` becomes
        None; without only its embed/head it shares the main model's. A model built without MTP skips them."""
        optional = mtp_optional(self.cfg.tie_word_embeddings)
        target_fn = hf_weight_target if self.mtp is not None else hf_weight_target_without_mtp
        loaded, _ = load_named_weights(self, weights, self.cfg, target_fn=target_fn, optional=optional)
        if self.mtp is not None:
            self.mtp = self.mtp.finish_loading(loaded, self.model.embed_tokens, self.lm_head)
        return loaded
