"""CUDA graphs for decode steps: the model's forward pass captured once per padded batch size, replayed
with new inputs copied into fixed-address buffers.

A decode step launches a few hundred small kernels (47 layers x attention, MoE, norms); replaying a
graph removes their launch cost and the Python between them, which dominates at small batches.

- Buckets: 1, 2, 4, 8, then every 8 up to the maximum (default 512). A step of n sequences runs in the
  smallest bucket >= n; rows n.. are padding (see StaticDecodeInputs).
- Only the forward pass to the final hidden states is captured; logits (one GEMM on the rows that
  sample) and sampling run eagerly after it.
- Eligible steps: every sequence adds exactly one token, the batch fits a bucket, no per-layer callback
  (layer-wise KV streaming runs eagerly). Anything else runs eagerly, unchanged.
- MTP speculative decoding captures the same way with `tokens_per_seq` = k + 1 (the verify step: last
  token + k drafts per sequence) and its draft chain (spec_decode/graphs.py).
- Requirements on the model and backend (`graph_unsafe_reason` checks them): the attention backend
  declares `supports_cuda_graphs` (no host syncs, every per-step value read from the ForwardContext's
  device tensors); the MoE experts are not the torch reference (it syncs to count tokens per expert).
- Host values seen at capture: `seq_lens_cpu` holds `split_context_len` for every row. Backends may use
  host lengths only to size launches (e.g. split-KV count), never for results; the real lengths are in
  the device tensors. The RoPE tables are grown to max_model_len before capture so they never move.

All buckets share one memory pool, captured from the largest down, so the pool is sized by the largest.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.attention.context import ForwardContext, SeqChunk
from glmserve.engine.attention.split_backend import SplitAttentionBackend
from glmserve.engine.models.moe import MoE, experts_reference
from glmserve.engine.models.rope import RotaryEmbedding

DEFAULT_MAX_BATCH_SIZE = 512
# Host-side context length the backends plan launches for at capture (split-KV): long enough that
# 1k-8k contexts get enough splits to fill the GPU at small batches, short enough not to over-split.
DEFAULT_SPLIT_CONTEXT_LEN = 4096
_WARMUP_RUNS = 2  # compiles each bucket's Triton kernels and settles the allocator before capture


def capture_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... up to max_batch_size, which is always the last bucket."""
    if max_batch_size < 1:
        return []
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch_size] + list(range(16, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def chosen_batch_sizes(max_batch_size: int, capture_sizes: tuple[int, ...] = ()) -> list[int]:
    """The buckets to capture: the given sizes (vLLM's cudagraph_capture_sizes) up to max_batch_size, else
    the default ladder. Batches above the largest bucket run eagerly."""
    if not capture_sizes:
        return capture_batch_sizes(max_batch_size)
    return sorted({s for s in capture_sizes if 0 < s <= max_batch_size})


def bucket_for(num_seqs: int, sizes: list[int]) -> int | None:
    """Smallest bucket holding num_seqs rows, None when none does."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) and num_seqs > 0 else None


def graph_unsafe_reason(model: nn.Module, backend: AttentionBackend, device: torch.device,
                        tokens_per_seq: int = 1) -> str | None:
    """Why steps of `model` with `tokens_per_seq` new tokens per sequence (1: decode; k + 1: MTP verify)
    cannot be captured on `device`, or None when they can."""
    if torch.device(device).type != "cuda":
        return f"CUDA graphs need a CUDA device, got {torch.device(device).type!r}"
    if tokens_per_seq > 1 and isinstance(backend, SplitAttentionBackend):
        backend = backend.prefill  # several tokens per sequence is not a decode-only step: the prefill side runs it
    if not getattr(backend, "supports_cuda_graphs", False):
        return f"attention backend {backend.name!r} has no graph-safe decode path"
    if getattr(model, "cuda_graph_unsafe_reason", None):
        return model.cuda_graph_unsafe_reason
    for name, module in model.named_modules():
        if isinstance(module, MoE) and module.experts_fn is experts_reference:
            return f"{name} uses the torch reference experts, which sync with the host (select the Triton kernels)"
    return None


class StaticDecodeInputs:
    """The fixed-address input tensors of the decode graphs, and how a step is written into them.

    Every sequence adds `tokens_per_seq` (q) tokens: 1 for a plain decode step, k + 1 for an MTP verify
    step ([last token + k drafts]) or the MTP layer's pass over those positions. Rows i*q..i*q+q-1 of a
    bucket-b step are sequence i < n. Sequences n..b-1 are padding: token 0 at positions 0..q-1, slot -1
    (no KV is stored) and seq_len q over a block-table row of zeros, so their attention reads cached
    tokens of block 0 (finite, never written by them) and their outputs are dropped. query_start_loc is
    0, q, 2q, ..: fixed at capture.
    """

    def __init__(self, max_batch_size: int, max_blocks_per_seq: int, block_size: int, device: torch.device,
                 tokens_per_seq: int = 1):
        self.max_batch_size = max_batch_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.q = q = tokens_per_seq
        i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(max_batch_size * q, **i64)
        self.positions = torch.zeros(max_batch_size * q, **i64)
        self.slot_mapping = torch.full((max_batch_size * q,), -1, **i64)
        self.seq_lens = torch.full((max_batch_size,), q, **i32)
        self.query_start_loc = torch.arange(0, max_batch_size * q + 1, q, **i32)
        self.block_tables = torch.zeros(max_batch_size, max_blocks_per_seq, **i32)

    def fits(self, seqs: list[SeqChunk]) -> bool:
        """A step of q new tokens per sequence whose batch and contexts fit the buffers."""
        if not seqs or len(seqs) > self.max_batch_size:
            return False
        limit, q = self.max_blocks_per_seq * self.block_size, self.q
        return all(s.num_new == q and s.num_cached + q <= limit for s in seqs)

    def fill(self, input_ids: list[int], seqs: list[SeqChunk], bucket: int) -> None:
        """Write a step of len(seqs) <= bucket sequences (q tokens each, input_ids in sequence order) into
        rows 0..bucket*q-1, padding included."""
        n, bs, q = len(seqs), self.block_size, self.q
        pad = bucket - n
        positions, slots = [], []
        for s in seqs:
            blocks = s.block_ids
            for p in range(s.num_cached, s.num_cached + q):
                positions.append(p)
                slots.append(blocks[p // bs] * bs + p % bs)
        positions += list(range(q)) * pad
        slots += [-1] * (q * pad)
        seq_lens = [s.num_cached + q for s in seqs] + [q] * pad
        width = max(-(-sl // bs) for sl in seq_lens)
        rows = []
        for s, sl in zip(seqs, seq_lens):
            need = -(-sl // bs)
            rows.append(s.block_ids[:need] + [0] * (width - need))
        table = torch.tensor(rows + [[0] * width] * pad, dtype=torch.int32)
        m = bucket * q
        self.input_ids[:m].copy_(torch.tensor(list(input_ids) + [0] * (q * pad), dtype=torch.int64))
        self.positions[:m].copy_(torch.tensor(positions, dtype=torch.int64))
        self.slot_mapping[:m].copy_(torch.tensor(slots, dtype=torch.int64))
        self.seq_lens[:bucket].copy_(torch.tensor(seq_lens, dtype=torch.int32))
        # Columns past `width` keep stale block ids: never read (each row reads ceil(seq_len / bs) pages).
        self.block_tables[:bucket, :width].copy_(table)

    def context(self, bucket: int, kv_caches: list[torch.Tensor], host_seq_len: int) -> ForwardContext:
        """The ForwardContext of bucket `bucket`: views of the buffers, so every replay sees new values."""
        m = bucket * self.q
        return ForwardContext(
            positions=self.positions[:m],
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            slot_mapping=self.slot_mapping[:m],
            block_size=self.block_size,
            kv_caches=kv_caches,
            query_lens_cpu=[self.q] * bucket,
            seq_lens_cpu=[max(host_seq_len, self.q)] * bucket,
        )


@dataclass
class CaptureStats:
    num_graphs: int = 0
    batch_sizes: tuple[int, ...] = ()
    capture_seconds: float = 0.0
    # torch's caching allocator: bytes reserved for the graphs' pool (activations of the largest bucket).
    pool_bytes: int = 0
    # Device memory that disappeared during capture as the driver sees it (pool + graph objects).
    device_bytes: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        return d


def grow_rope_tables(model: nn.Module, max_model_len: int, device: torch.device) -> None:
    """Size every RoPE cos/sin table for max_model_len now, so no replay ever needs a bigger (moved) one."""
    pos = torch.zeros(1, dtype=torch.int64, device=device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.cos_sin(pos, torch.float32, max_model_len - 1)


class CudaGraphRunner:
    """Captures the decode buckets of one model and KV cache, and replays them."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], block_size: int, max_batch_size: int,
                 max_model_len: int, device: torch.device, split_context_len: int = DEFAULT_SPLIT_CONTEXT_LEN,
                 capture_sizes: tuple[int, ...] = (), tokens_per_seq: int = 1):
        """tokens_per_seq: new tokens of every sequence in a captured step (k + 1 for MTP verify steps);
        max_model_len counts every position a step may write (speculative lookahead included)."""
        self.model = model
        self.kv_caches = kv_caches
        self.device = torch.device(device)
        self.max_model_len = max_model_len
        self.sizes = chosen_batch_sizes(max_batch_size, capture_sizes)
        self.host_seq_len = max(1, min(split_context_len, max_model_len))
        max_blocks = -(-max_model_len // block_size)
        self.inputs = StaticDecodeInputs(self.sizes[-1] if self.sizes else 0, max_blocks, block_size, self.device,
                                         tokens_per_seq)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.stats = CaptureStats()
        self.num_replays = 0

    def can_run(self, seqs: list[SeqChunk]) -> bool:
        return bool(self.graphs) and self.inputs.fits(seqs)

    def _forward(self, bucket: int, ctx: ForwardContext) -> torch.Tensor:
        return self.model(self.inputs.input_ids[: bucket * self.inputs.q], ctx.positions, ctx)

    @torch.inference_mode()
    def capture(self) -> CaptureStats:
        grow_rope_tables(self.model, self.max_model_len, self.device)
        torch.cuda.synchronize(self.device)
        # Capturing empties the allocator's cache (torch.cuda.graph does): empty it first, so that the
        # figures below count the graphs' pool and not the cache released during capture (negative otherwise).
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        reserved_before = torch.cuda.memory_reserved(self.device)
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool
            ctx = self.inputs.context(bucket, self.kv_caches, self.host_seq_len)
            for _ in range(_WARMUP_RUNS):
                self._forward(bucket, ctx)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(bucket, ctx)
            self.graphs[bucket] = graph
            self.outputs[bucket] = out
        torch.cuda.synchronize(self.device)
        self.stats = CaptureStats(
            num_graphs=len(self.graphs),
            batch_sizes=tuple(self.sizes),
            capture_seconds=time.perf_counter() - start,
            pool_bytes=torch.cuda.memory_reserved(self.device) - reserved_before,
            device_bytes=free_before - torch.cuda.mem_get_info(self.device)[0],
        )
        return self.stats

    def run(self, input_ids: list[int], seqs: list[SeqChunk]) -> torch.Tensor:
        """Hidden states [n * q, H] of a step (a view of the graph's output: use it before the next run)."""
        bucket = bucket_for(len(seqs), self.sizes)
        self.inputs.fill(input_ids, seqs, bucket)
        self.graphs[bucket].replay()
        self.num_replays += 1
        return self.outputs[bucket][: len(seqs) * self.inputs.q]
