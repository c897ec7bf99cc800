"""The multi-token-prediction (MTP) layer GLM checkpoints carry at index `num_hidden_layers` (docs/MODELS.md §5).

Draft step: x = eh_proj(concat(enorm(embed(token)), hnorm(h_prev))) -> one decoder layer -> shared_head.norm;
logits = shared_head.head(that). h_prev is the target model's final (normed) hidden state at the previous
position. The decoder layer is of the model's own kind (GQA or MLA), passed in as a class, and uses KV-cache
layer `num_hidden_layers`: a context used with the MTP layer must hold num_hidden_layers + 1 caches.

Built only when speculative decoding asks for it (`with_mtp`, from EngineConfig.speculative_algorithm), and then
loaded when the checkpoint has its weights; speculative decoding itself comes later.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.attention.context import ForwardContext
from glmserve.engine.config import ModelConfig
from glmserve.engine.models.layers import Linear, RMSNorm
from glmserve.engine.models.rope import RotaryEmbedding

# Parameters of the MTP layer that a checkpoint may omit: they then share the main model's.
_SHAREABLE = ("mtp.embed_tokens.weight", "mtp.shared_head.head.weight")


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size)


class MTPLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        backend: AttentionBackend,
        decoder_layer_cls: Callable[[ModelConfig, int, AttentionBackend], nn.Module],
        rotary: RotaryEmbedding,
    ):
        """`decoder_layer_cls(cfg, layer_idx, backend)` builds a layer whose forward is (x, cos, sin, ctx)."""
        super().__init__()
        h = cfg.hidden_size
        self.layer_idx = cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * h, h)
        self.layer = decoder_layer_cls(cfg, self.layer_idx, backend)
        self.shared_head = SharedHead(cfg)
        self._rotary = (rotary,)  # the main model's table; a tuple keeps it from registering as a submodule

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, prev_hidden: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """Hidden [T, H] after shared_head.norm, for tokens input_ids [T] at positions [T]."""
        e = self.enorm(self.embed_tokens(input_ids))
        x = self.eh_proj(torch.cat([e, self.hnorm(prev_hidden.to(e.dtype))], dim=-1))
        max_pos = max(ctx.seq_lens_cpu) - 1 if ctx.seq_lens_cpu else None
        cos, sin = self._rotary[0].cos_sin(positions, x.dtype, max_pos)
        x = self.layer(x, cos, sin, ctx)
        return self.shared_head.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(hidden).float()

    def finish_loading(self, loaded: set[str], embed: nn.Embedding, head: Linear) -> "MTPLayer | None":
        """After a checkpoint load: None when the checkpoint had no MTP weights; an error when it had only some;
        missing embed_tokens / shared_head.head share the main model's."""
        from glmserve.engine.models.weight_utils import WeightLoadError

        own = {n for n in loaded if n.startswith("mtp.")}
        if not own:
            return None
        names = {f"mtp.{n}" for n, _ in self.named_parameters()}
        missing = sorted(names - own - set(_SHAREABLE))
        if missing:
            raise WeightLoadError(f"checkpoint has a partial MTP layer; missing: {', '.join(missing)}")
        if "mtp.embed_tokens.weight" not in own:
            self.embed_tokens.weight = embed.weight
        if "mtp.shared_head.head.weight" not in own:
            self.shared_head.head.weight = head.weight
        return self


def mtp_optional(tie_word_embeddings: bool) -> Callable[[str], bool]:
    """Parameters a checkpoint may leave out: the whole MTP layer (checked by finish_loading), and lm_head
    when it is tied to the embeddings."""
    return lambda p: p.startswith("mtp.") or (tie_word_embeddings and p == "lm_head.weight")
