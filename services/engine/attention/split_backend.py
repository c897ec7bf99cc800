"""Different backends for prefill-carrying steps and decode-only steps (e.g. FA3 prefill with a
graph-capturable decode backend), behind the one AttentionBackend interface the models call."""

from __future__ import annotations

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.attention.context import ForwardContext


class SplitAttentionBackend(AttentionBackend):
    def __init__(self, prefill: AttentionBackend, decode: AttentionBackend):
        self.prefill = prefill
        self.decode = decode
        self.name = f"{prefill.name}+{decode.name}"
        # CUDA graphs capture decode-only steps, which always go to the decode backend.
        self.supports_cuda_graphs = decode.supports_cuda_graphs

    def _for(self, ctx: ForwardContext) -> AttentionBackend:
        return self.decode if ctx.is_decode_only else self.prefill

    def prepare(self, ctx: ForwardContext) -> None:
        self._for(ctx).prepare(ctx)

    def gqa(self, layer, q, k, v, ctx, scale):
        return self._for(ctx).gqa(layer, q, k, v, ctx, scale)

    def mla(self, layer, q_nope, q_rope, latent, k_rope, weights, ctx, scale):
        return self._for(ctx).mla(layer, q_nope, q_rope, latent, k_rope, weights, ctx, scale)
