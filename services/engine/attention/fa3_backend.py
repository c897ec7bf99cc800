"""FlashAttention-3 (Hopper) for prefill, over the paged cache, with chunked prefill and prefix hits.

Two providers, picked by `create_fa3_backend`:
- the FA3 library (`flash_attn_interface`, built from flash-attention/hopper) when installed:
  `flash_attn_with_kvcache` with a page table attends varlen query chunks over the paged cache (causal
  mask aligned to the end of each sequence's KV, so cached prefixes just work); a step with no cached
  prefix at all uses `flash_attn_varlen_func` on the new K/V directly. MLA uses FA3's `qv` input:
  q = q_rope against k = the cache's rope slice, qv = q_latent against v = the latent slice, so
  score = q_rope.k_rope + q_latent.c and the output is latent, the absorbed path.
- otherwise FlashInfer with backend="fa3" (FlashInferAttentionBackend(prefill_backend="fa3")).

Decode-only steps go to FlashInfer's decode / MLA wrappers when flashinfer is installed (the issue's
split: FA3 prefill, FlashInfer decode); without flashinfer FA3 runs them too.
"""

from __future__ import annotations


from glmserve.engine.attention.backend import AttentionBackend, MLAWeights
from glmserve.engine.attention.capability import BackendUnavailable, fa3_installed, flashinfer_installed
from glmserve.engine.attention.context import ForwardContext
from glmserve.engine.attention.triton_backend import absorb_query, expand_output, store_kv_gqa, store_kv_mla

_STATE_KEY = "fa3"


def import_fa3():
    try:
        import flash_attn_interface
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BackendUnavailable(
            f"the fa3 attention backend needs the FlashAttention-3 library (`flash_attn_interface`): {e}") from e
    return flash_attn_interface


def _first(result):
    # Some FA3 releases return (out, softmax_lse) from the varlen entry point.
    return result[0] if isinstance(result, tuple) else result


class FA3AttentionBackend(AttentionBackend):
    name = "fa3"

    def __init__(self, decode_backend: AttentionBackend | None = None):
        self._fa = import_fa3()
        self._decode = decode_backend

    def prepare(self, ctx: ForwardContext) -> None:
        ctx.backend_state[_STATE_KEY] = {
            "max_query_len": max(ctx.query_lens_cpu, default=1),
            # Fresh prompts only: attention needs nothing from the cache.
            "no_prefix": all(q == s for q, s in zip(ctx.query_lens_cpu, ctx.seq_lens_cpu)),
        }
        if self._decode is not None and ctx.is_decode_only:
            self._decode.prepare(ctx)

    def _state(self, ctx: ForwardContext) -> dict:
        if _STATE_KEY not in ctx.backend_state:
            self.prepare(ctx)
        return ctx.backend_state[_STATE_KEY]

    def gqa(self, layer, q, k, v, ctx: ForwardContext, scale):
        if self._decode is not None and ctx.is_decode_only:
            return self._decode.gqa(layer, q, k, v, ctx, scale)
        state = self._state(ctx)
        cache = ctx.kv_caches[layer]
        store_kv_gqa(cache, ctx.slot_mapping, k, v)
        max_q = state["max_query_len"]
        if state["no_prefix"]:
            out = _first(self._fa.flash_attn_varlen_func(
                q, k, v, ctx.query_start_loc, ctx.query_start_loc, max_q, max_q,
                softmax_scale=scale, causal=True))
        else:
            out = self._fa.flash_attn_with_kvcache(
                q, cache[:, 0], cache[:, 1],
                cache_seqlens=ctx.seq_lens, page_table=ctx.block_tables,
                cu_seqlens_q=ctx.query_start_loc, max_seqlen_q=max_q,
                softmax_scale=scale, causal=True)
        return out

    def mla(self, layer, q_nope, q_rope, latent, k_rope, weights: MLAWeights, ctx: ForwardContext, scale):
        if self._decode is not None and ctx.is_decode_only:
            return self._decode.mla(layer, q_nope, q_rope, latent, k_rope, weights, ctx, scale)
        state = self._state(ctx)
        cache = ctx.kv_caches[layer]
        store_kv_mla(cache, ctx.slot_mapping, latent, k_rope)
        rank = latent.shape[-1]
        q_latent = absorb_query(q_nope, weights).contiguous()
        # The cache viewed as one KV head: k = rope slice [N, bs, 1, Dr], v = latent slice [N, bs, 1, R].
        o_latent = self._fa.flash_attn_with_kvcache(
            q_rope, cache[..., rank:].unsqueeze(2), cache[..., :rank].unsqueeze(2), qv=q_latent,
            cache_seqlens=ctx.seq_lens, page_table=ctx.block_tables,
            cu_seqlens_q=ctx.query_start_loc, max_seqlen_q=state["max_query_len"],
            softmax_scale=scale, causal=True)
        return expand_output(o_latent, weights)


def create_fa3_backend() -> AttentionBackend:
    """FA3 library when installed (FlashInfer decode beside it when available), else FlashInfer's FA3."""
    if fa3_installed():
        decode = None
        if flashinfer_installed():
            from glmserve.engine.attention.flashinfer_backend import FlashInferAttentionBackend

            decode = FlashInferAttentionBackend()
        return FA3AttentionBackend(decode_backend=decode)
    from glmserve.engine.attention.flashinfer_backend import FlashInferAttentionBackend

    return FlashInferAttentionBackend(prefill_backend="fa3", name="fa3")
