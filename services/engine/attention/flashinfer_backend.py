"""Attention through FlashInfer's paged-KV wrappers (CUDA only; flashinfer-python is an optional extra).

- GQA, decode-only steps: `BatchDecodeWithPagedKVCacheWrapper` (tensor cores for large query groups).
- GQA, steps with prefill chunks (mixed with decode rows): `BatchPrefillWithPagedKVCacheWrapper` with
  causal=True. FlashInfer aligns the causal mask to the end of each sequence's KV, which is exactly
  "query j of a q-token chunk sits at position seq_len - q + j", so cached prefixes need nothing extra.
  `prefill_backend="fa3"` selects FlashInfer's Hopper FA3 kernels.
- MLA: `BatchMLAPagedAttentionWrapper` over the latent cache on the absorbed path; the cache's latent
  and rope slices are passed as strided views of the one `[N, bs, R + Dr]` tensor.

Our cache layout `[N, 2, bs, Hkv, D]` is FlashInfer's single-tensor NHD layout, used as is.

Planning: `prepare(ctx)` builds the page-table metadata once per step (host-side indptrs, one gather of
the device block table). The wrapper's `plan()` also needs head counts and dtypes, which the backend
interface hands over only with the first layer's tensors, so the first layer of a step plans and every
later layer reuses that plan: one plan per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glmserve.engine.attention.backend import AttentionBackend, MLAWeights
from glmserve.engine.attention.capability import BackendUnavailable
from glmserve.engine.attention.context import ForwardContext
from glmserve.engine.attention.triton_backend import absorb_query, expand_output, store_kv_gqa, store_kv_mla

WORKSPACE_BYTES = 256 * 1024 * 1024
_STATE_KEY = "flashinfer"


def import_flashinfer():
    try:
        import flashinfer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BackendUnavailable(
            "the flashinfer attention backend needs the `flashinfer-python` package "
            f"(install the `gpu` extra): {e}") from e
    return flashinfer


@dataclass
class PagedMetadata:
    """FlashInfer's CSR view of the step's page tables. Indptrs stay on the host (plan() reads them
    there); the page indices live on the device."""

    qo_indptr: torch.Tensor  # [B+1] int32, host
    kv_indptr: torch.Tensor  # [B+1] int32, host
    kv_indices: torch.Tensor  # [num_pages] int32, device
    kv_last_page_len: torch.Tensor  # [B] int32, host
    kv_lens: torch.Tensor  # [B] int32, host
    decode_only: bool
    max_query_len: int
    planned: dict = field(default_factory=dict)  # wrapper name -> plan key of this step


def paged_metadata(ctx: ForwardContext) -> PagedMetadata:
    bs = ctx.block_size
    pages = [-(-s // bs) for s in ctx.seq_lens_cpu]
    width = ctx.block_tables.shape[1]
    # Flat positions of the used table entries, built on the host: one H2D copy, no device sync.
    flat = [row * width + col for row, n in enumerate(pages) for col in range(n)]
    index = torch.tensor(flat, dtype=torch.int64).to(ctx.block_tables.device, non_blocking=True)
    kv_indptr = [0]
    for n in pages:
        kv_indptr.append(kv_indptr[-1] + n)
    qo_indptr = [0]
    for q in ctx.query_lens_cpu:
        qo_indptr.append(qo_indptr[-1] + q)
    i32 = dict(dtype=torch.int32)
    return PagedMetadata(
        qo_indptr=torch.tensor(qo_indptr, **i32),
        kv_indptr=torch.tensor(kv_indptr, **i32),
        kv_indices=ctx.block_tables.reshape(-1)[index].to(torch.int32),
        kv_last_page_len=torch.tensor([s - (n - 1) * bs for s, n in zip(ctx.seq_lens_cpu, pages)], **i32),
        kv_lens=torch.tensor(ctx.seq_lens_cpu, **i32),
        decode_only=ctx.is_decode_only,
        max_query_len=max(ctx.query_lens_cpu, default=1),
    )


class FlashInferAttentionBackend(AttentionBackend):
    name = "flashinfer"

    def __init__(self, prefill_backend: str = "auto", name: str | None = None):
        self._fi = import_flashinfer()
        self.prefill_backend = prefill_backend  # "auto" | "fa2" | "fa3"
        if name is not None:
            self.name = name
        self._workspace: torch.Tensor | None = None
        self._wrappers: dict[str, object] = {}

    # -- per step ---------------------------------------------------------------------------
    def prepare(self, ctx: ForwardContext) -> None:
        ctx.backend_state[_STATE_KEY] = paged_metadata(ctx)

    def _meta(self, ctx: ForwardContext) -> PagedMetadata:
        if _STATE_KEY not in ctx.backend_state:  # a caller that skipped prepare()
            self.prepare(ctx)
        return ctx.backend_state[_STATE_KEY]

    def _wrapper(self, kind: str, device: torch.device, **kwargs):
        if kind not in self._wrappers:
            if self._workspace is None:
                # One float workspace shared by the wrappers: a step runs only one of them per layer.
                self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            fi = self._fi
            if kind.startswith("decode"):
                self._wrappers[kind] = fi.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD", **kwargs)
            elif kind == "prefill":
                self._wrappers[kind] = fi.BatchPrefillWithPagedKVCacheWrapper(
                    self._workspace, "NHD", backend=self.prefill_backend)
            else:
                self._wrappers[kind] = fi.mla.BatchMLAPagedAttentionWrapper(
                    self._workspace, backend="fa3" if self.prefill_backend == "fa3" else "auto")
        return self._wrappers[kind]

    # -- attention ----------------------------------------------------------------------------
    def gqa(self, layer, q, k, v, ctx: ForwardContext, scale):
        cache = ctx.kv_caches[layer]
        store_kv_gqa(cache, ctx.slot_mapping, k, v)
        meta = self._meta(ctx)
        num_qo_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = cache.shape[3]
        key = (num_qo_heads, num_kv_heads, head_dim, q.dtype, cache.dtype, float(scale))
        if meta.decode_only:
            # Tensor-core decode pays off once several query heads share a KV head (GLM-4.5: 12).
            kind = "decode_tc" if num_qo_heads // num_kv_heads >= 4 else "decode"
            wrapper = self._wrapper(kind, q.device, use_tensor_cores=kind == "decode_tc")
            if meta.planned.get(kind) != key:
                wrapper.plan(
                    meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len,
                    num_qo_heads, num_kv_heads, head_dim, ctx.block_size,
                    q_data_type=q.dtype, kv_data_type=cache.dtype, sm_scale=scale,
                )
                meta.planned[kind] = key
        else:
            kind = "prefill"
            wrapper = self._wrapper(kind, q.device)
            if meta.planned.get(kind) != key:
                wrapper.plan(
                    meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len,
                    num_qo_heads, num_kv_heads, head_dim, ctx.block_size,
                    causal=True, sm_scale=scale, q_data_type=q.dtype, kv_data_type=cache.dtype,
                )
                meta.planned[kind] = key
        out = wrapper.run(q.contiguous(), cache)
        return out

    def mla(self, layer, q_nope, q_rope, latent, k_rope, weights: MLAWeights, ctx: ForwardContext, scale):
        cache = ctx.kv_caches[layer]
        store_kv_mla(cache, ctx.slot_mapping, latent, k_rope)
        meta = self._meta(ctx)
        rank, rope = latent.shape[-1], k_rope.shape[-1]
        q_latent = absorb_query(q_nope, weights).contiguous()
        num_heads = q_latent.shape[1]
        wrapper = self._wrapper("mla", q_latent.device)
        key = (num_heads, rank, rope, q_latent.dtype, cache.dtype, float(scale))
        if meta.planned.get("mla") != key:
            wrapper.plan(
                meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.kv_lens,
                num_heads, rank, rope, ctx.block_size, True, scale, q_latent.dtype, cache.dtype,
            )
            meta.planned["mla"] = key
        o_latent = wrapper.run(q_latent, q_rope.contiguous(), cache[..., :rank], cache[..., rank:])
        return expand_output(o_latent, weights)
