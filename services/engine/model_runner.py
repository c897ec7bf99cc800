"""Turns scheduled chunks into one forward pass and returns logits for the rows that sample.

On CUDA the model's hooks get the Triton kernels (kernel_selection.py) and decode-only steps replay
CUDA graphs (cuda_graphs.py) when the backend allows it; every other step runs eagerly.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from glmserve.engine.attention.backend import AttentionBackend, KVCacheSpec
from glmserve.engine.attention.context import SeqChunk
from glmserve.engine.config import CacheConfig, ModelConfig
from glmserve.engine.cuda_graphs import DEFAULT_MAX_BATCH_SIZE, CudaGraphRunner, graph_unsafe_reason
from glmserve.engine.encoder_cache import EncoderCache
from glmserve.engine.kernel_selection import select_kernels
from glmserve.engine.kv_cache import allocate_kv_caches, kv_cache_spec
from glmserve.engine.mm_step import MultiModalStepBuilder
from glmserve.engine.parallel import parallel_state
from glmserve.engine.scheduler import ScheduledChunk
from glmserve.engine.step_inputs import StepInputBuilder, tensor_from_list

logger = logging.getLogger(__name__)


def plan_num_blocks(spec: KVCacheSpec, num_layers: int, dtype: torch.dtype, device: torch.device,
                    cfg: CacheConfig, max_len: int = 0) -> int:
    """KV blocks to allocate: explicit, else a fraction of free GPU memory, else a CPU byte budget.
    On a GPU, a budget that cannot hold one sequence of max_len tokens is refused (as vLLM does) instead of
    serving with a pool every request would finish in at once, with no tokens."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    per_block = spec.bytes_per_block(dtype) * num_layers
    if device.type == "cuda":
        # Memory an earlier engine of this process left in torch's cache (or in unreachable cycles) is ours to
        # use: release it first, else a second engine sees ~(1 - utilization) free and gets one block.
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - cfg.gpu_memory_utilization) * total
        blocks, needed = int(budget // per_block), -(-max_len // spec.block_size)
        if blocks < needed:
            raise ValueError(
                f"the KV cache gets {max(blocks, 0)} blocks from {budget / 2**30:.2f} GiB ({free / 2**30:.1f} of "
                f"{total / 2**30:.1f} GiB free, gpu_memory_utilization {cfg.gpu_memory_utilization}); one sequence "
                f"of max_model_len {max_len} needs {needed}: lower --max-model-len, raise --gpu-memory-utilization, "
                f"or free GPU memory (another engine in this process holds its share until it is gone)")
        return blocks
    else:
        budget = cfg.cpu_kv_bytes
    return max(1, int(budget // per_block))


@dataclass
class StepResult:
    # Logits [N, V] fp32, one row per chunk that completes its sequence, in chunk order.
    logits: torch.Tensor
    sample_chunks: list[ScheduledChunk]
    hidden: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_cfg: ModelConfig, backend: AttentionBackend,
                 cache_cfg: CacheConfig, dtype: torch.dtype, device: torch.device,
                 enable_cuda_graph: bool = False, cuda_graph_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_model_len: int | None = None, cuda_graph_capture_sizes: tuple[int, ...] = (),
                 extra_kv_layers: int = 0, num_lookahead_tokens: int = 0):
        """extra_kv_layers: cache layers past the decoder stack (the MTP draft layer's); num_lookahead_tokens:
        slots a sequence may hold past the context limit (speculative drafts)."""
        self.model = model
        self.model_cfg = model_cfg
        self.backend = backend
        self.device = device
        self.block_size = cache_cfg.block_size
        self.spec = kv_cache_spec(model_cfg, cache_cfg.block_size)
        num_kv_layers = model_cfg.num_hidden_layers + extra_kv_layers
        max_len = (max_model_len or model_cfg.max_position_embeddings) + num_lookahead_tokens
        # Every rank of a tensor-parallel group must hold the block ids the leader hands out.
        self.num_blocks = parallel_state.current().min_over_ranks(
            plan_num_blocks(self.spec, num_kv_layers, dtype, device, cache_cfg, max_len))
        self.kv_caches = allocate_kv_caches(self.spec, num_kv_layers, self.num_blocks, dtype, device)
        self.kernels = select_kernels(model, device)  # which kernels were chosen: the benchmarks report it
        self.inputs = StepInputBuilder(min(self.num_blocks, -(-max_len // self.block_size) + 1), self.block_size, device)
        # Vision models: M-RoPE positions and image embeddings per step, encoder outputs cached by image.
        self.mm = MultiModalStepBuilder(model, EncoderCache()) if hasattr(model, "encode_images") else None
        self.graphs: CudaGraphRunner | None = None
        self.cuda_graph_disabled_reason: str | None = "disabled by configuration"
        if enable_cuda_graph and cuda_graph_max_batch_size > 0:
            self.cuda_graph_disabled_reason = graph_unsafe_reason(model, backend, device)
            if self.cuda_graph_disabled_reason is None and parallel_state.current().is_parallel:
                # Captures would hold NCCL collectives: never run here (one GPU), so eager until they are.
                self.cuda_graph_disabled_reason = "not yet validated with tensor parallelism (multi-GPU untested)"
            if self.cuda_graph_disabled_reason is None:
                self.graphs = CudaGraphRunner(model, self.kv_caches, self.block_size, cuda_graph_max_batch_size,
                                              max_model_len or model_cfg.max_position_embeddings, device,
                                              capture_sizes=cuda_graph_capture_sizes)
                try:
                    self.graphs.capture()
                except RuntimeError as e:  # e.g. an op that syncs: serve eagerly, and say why in the stats
                    logger.warning("CUDA graph capture failed, decode runs eagerly: %s", e)
                    self.graphs, self.cuda_graph_disabled_reason = None, f"capture failed: {e}"

    def cuda_graph_stats(self) -> dict:
        """Capture time and memory of the decode graphs (what the benchmarks print), or why there are none."""
        if self.graphs is None:
            return {"enabled": False, "reason": self.cuda_graph_disabled_reason}
        return {"enabled": True, **self.graphs.stats.as_dict(), "num_replays": self.graphs.num_replays}

    def release_rows(self, request_ids: list[str]) -> None:
        self.inputs.release(request_ids)

    @staticmethod
    def _seqs(chunks: list[ScheduledChunk]) -> list[SeqChunk]:
        return [SeqChunk(c.request.block_ids, c.request.num_computed_tokens, c.num_new_tokens) for c in chunks]

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk], on_layer_done: Callable[[int], None] | None = None,
                keep_hidden: bool = False) -> StepResult:
        seqs = self._seqs(chunks) if self.graphs is not None and on_layer_done is None else None
        if seqs is not None and self.graphs.can_run(seqs):
            ids = [c.request.token_ids[c.request.num_computed_tokens] for c in chunks]  # one token each
            hidden = self.graphs.run(ids, seqs)
            if keep_hidden:
                hidden = hidden.clone()  # the graph's output buffer is overwritten by the next replay
        else:
            input_ids, ctx = self.inputs.build(chunks, self.kv_caches, on_layer_done)
            self.backend.prepare(ctx)
            if self.mm is not None:
                positions, image_embeds, image_rows = self.mm.build(chunks, ctx.positions)
                hidden = self.model(input_ids, positions, ctx, image_embeds=image_embeds, image_rows=image_rows)
            else:
                hidden = self.model(input_ids, ctx.positions, ctx)
        sample_chunks, ends = self._sample_rows(chunks, hidden.shape[0])
        if ends is None:  # every row samples (a decode step): no gather
            rows = hidden
        else:
            rows = hidden.index_select(0, tensor_from_list(ends, np.int64, self.device))
        logits = (self.model.compute_logits(rows) if sample_chunks
                  else hidden.new_empty(0, self.model_cfg.vocab_size))
        return StepResult(logits.float(), sample_chunks, hidden if keep_hidden else None)

    @staticmethod
    def _sample_rows(chunks: list[ScheduledChunk], num_rows: int) -> tuple[list[ScheduledChunk], list[int] | None]:
        """The chunks that complete their sequence (c.completes_sequence, inlined: this runs per sequence
        every step) and their last rows of the step's hidden states; None for the rows when every row
        samples (one token per chunk, each the last of its sequence)."""
        if num_rows == len(chunks):  # one token per chunk
            sample_chunks = [c for c in chunks if c.request.num_computed_tokens + 1 >= len(c.request.token_ids)]
            if len(sample_chunks) == num_rows:
                return sample_chunks, None
        ends, sample_chunks, end = [], [], 0
        for c in chunks:
            n = c.num_new_tokens
            end += n
            r = c.request
            if r.num_computed_tokens + n >= len(r.token_ids):
                ends.append(end - 1)
                sample_chunks.append(c)
        return sample_chunks, ends
