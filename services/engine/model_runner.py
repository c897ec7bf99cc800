"""Turns scheduled chunks into one forward pass and returns logits for the rows that sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from glmserve.engine.attention.backend import AttentionBackend, KVCacheSpec
from glmserve.engine.attention.context import ForwardContext, SeqChunk, build_context
from glmserve.engine.config import CacheConfig, ModelConfig
from glmserve.engine.kv_cache import allocate_kv_caches, kv_cache_spec
from glmserve.engine.scheduler import ScheduledChunk


def plan_num_blocks(spec: KVCacheSpec, num_layers: int, dtype: torch.dtype, device: torch.device,
                    cfg: CacheConfig) -> int:
    """KV blocks to allocate: explicit, else a fraction of free GPU memory, else a CPU byte budget."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    per_block = spec.bytes_per_block(dtype) * num_layers
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - cfg.gpu_memory_utilization) * total
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
                 cache_cfg: CacheConfig, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.model_cfg = model_cfg
        self.backend = backend
        self.device = device
        self.block_size = cache_cfg.block_size
        self.spec = kv_cache_spec(model_cfg, cache_cfg.block_size)
        self.num_blocks = plan_num_blocks(self.spec, model_cfg.num_hidden_layers, dtype, device, cache_cfg)
        self.kv_caches = allocate_kv_caches(self.spec, model_cfg.num_hidden_layers, self.num_blocks, dtype, device)

    def build_context(self, chunks: list[ScheduledChunk],
                      on_layer_done: Callable[[int], None] | None = None) -> ForwardContext:
        seqs = [SeqChunk(c.request.block_ids, c.request.num_computed_tokens, c.num_new_tokens) for c in chunks]
        return build_context(seqs, self.block_size, self.kv_caches, self.device, on_layer_done)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk], on_layer_done: Callable[[int], None] | None = None,
                keep_hidden: bool = False) -> StepResult:
        ids: list[int] = []
        for c in chunks:
            r = c.request
            ids += r.all_token_ids[r.num_computed_tokens : r.num_computed_tokens + c.num_new_tokens]
        ctx = self.build_context(chunks, on_layer_done)
        self.backend.prepare(ctx)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, ctx.positions, ctx)
        ends, sample_chunks, end = [], [], 0
        for c in chunks:
            end += c.num_new_tokens
            if c.completes_sequence:
                ends.append(end - 1)
                sample_chunks.append(c)
        rows = hidden[torch.tensor(ends, dtype=torch.int64, device=self.device)]
        logits = self.model.compute_logits(rows) if ends else hidden.new_empty(0, self.model_cfg.vocab_size)
        return StepResult(logits.float(), sample_chunks, hidden if keep_hidden else None)
