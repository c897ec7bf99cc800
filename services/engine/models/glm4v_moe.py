"""GLM-4.5V / GLM-4.6V (`glm4v_moe`, transformers' Glm4vMoeForConditionalGeneration): the vision tower of
glm4v_vision.py in front of a GLM-4.5-Air-shaped MoE text model whose RoPE is M-RoPE over (t, h, w).

The text model is glm4_moe's decoder (GQA with bias, no QK norm, dense first layers then MoE). A step's
image tokens get their embeddings from the vision tower instead of the embedding table: the caller
(engine/mm_step.py) passes the encoder output rows and where they go. Decode steps see text positions
shifted by the request's M-RoPE offset and need nothing else.

Checkpoint names: `model.language_model.*` (transformers 5) or `model.*` (the published layout) for the
text model, `model.visual.*` for the tower, `lm_head.weight`. The published MTP layer
(`model.layers.{num_hidden_layers}`) is not used (transformers ignores it too) and is skipped.
FP8 checkpoints load as the text models' do (engine/fp8.py): whatever the checkpoint stores in FP8 (the
text model's linear layers and experts; the tower too if it was quantized) is dequantized on the CPU
and kept FP8 on FP8 GPUs; what its `ignore` list kept (lm_head, router gates, the tower) stays as stored.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.attention.context import ForwardContext
from glmserve.engine.config import ModelConfig
from glmserve.engine.models.glm4_moe import Glm4MoeDecoderLayer
from glmserve.engine.models.glm4v_vision import Glm4vVisionModel
from glmserve.engine.models.glm_base import GLMForCausalLM
from glmserve.engine.models.mrope import MRotaryEmbedding
from glmserve.engine.models.weight_utils import WeightTarget, hf_weight_target, load_named_weights

_TEXT = re.compile(r"^model\.language_model\.")
_VISUAL = re.compile(r"^model\.visual\.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def vl_weight_target(name: str, cfg: ModelConfig) -> WeightTarget | None:
    """Our target for a glm4v_moe checkpoint tensor (None: nothing to load)."""
    if _VISUAL.match(name):
        return WeightTarget("visual." + name[len("model.visual."):])
    name = _TEXT.sub("model.", name)
    m = _LAYER.match(name)
    if m and int(m[1]) >= cfg.num_hidden_layers:
        return None  # the MTP layer of the published checkpoints: unused
    return hf_weight_target(name, cfg)


class Glm4vMoeForConditionalGeneration(GLMForCausalLM):
    layer_cls = Glm4MoeDecoderLayer
    # Decode positions carry a per-request M-RoPE offset the captured graphs do not model.
    cuda_graph_unsafe_reason = "glm4v_moe decode steps add each request's M-RoPE offset (not captured)"
    # FP8 checkpoints (GLM-4.5V-FP8, GLM-4.6V-FP8): engine/fp8.py maps weights and scales through this.
    checkpoint_target = staticmethod(vl_weight_target)

    @staticmethod
    def make_rotary(cfg: ModelConfig) -> MRotaryEmbedding:
        return MRotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section, scaling=cfg.rope_scaling)

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, with_mtp: bool = False):
        if cfg.vision is None:
            raise ValueError(f"Glm4vMoeForConditionalGeneration needs a glm4v_moe config, got arch={cfg.arch!r}")
        super().__init__(cfg, backend, with_mtp=False)  # no MTP for the VL models
        self.visual = Glm4vVisionModel(cfg.vision)

    def encode_images(self, patches: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """Embeddings [sum of tokens, hidden] of the images whose patches are concatenated in `patches`."""
        w = self.visual.patch_embed.proj.weight
        return self.visual(patches.to(device=w.device, dtype=w.dtype), grid_thw)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                image_embeds: torch.Tensor | None = None, image_rows: torch.Tensor | None = None) -> torch.Tensor:
        """positions [3, T] (t, h, w) or [T] for text only; image_embeds [R, H] replace the embeddings of the
        step's tokens at indices image_rows [R]."""
        model = self.model
        x = model.embed_tokens(input_ids)
        if image_embeds is not None and image_rows is not None and image_rows.numel():
            x = x.index_copy(0, image_rows, image_embeds.to(x.dtype))
        cos, sin = model.rope(positions, x.dtype, ctx)
        for i, layer in enumerate(model.layers):
            x = layer(x, cos, sin, ctx)
            ctx.layer_done(i)
        return model.norm(x)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded, _ = load_named_weights(self, weights, self.cfg, target_fn=vl_weight_target)
        return loaded
