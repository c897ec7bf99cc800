"""CUDA graphs for MTP speculative decoding (engine/cuda_graphs.py captures the plain decode step).

Two captures per padded batch bucket, replayed when a step is a pure verify batch (every sequence
verifies exactly k drafts: k + 1 tokens, no prefill chunk); any other step runs eagerly, unchanged:
- verify: the target model over [last token + k drafts] of every sequence;
- draft (batches of greedy requests): the MTP layer over the same k + 1 positions, the row of each
  sequence's last accepted position picked on the device, then k - 1 chained one-token steps, each
  fed the previous step's hidden state and argmax. Its output is the [b, k] drafts: the whole chain
  costs one replay and one host sync.
The draft pass covers all k + 1 positions whatever was accepted, so its shape is fixed. The rows past a
sequence's accepted ones compute throwaway values and write MTP-layer KV at positions that the chained
steps or the next step's pass overwrite before any query reads them (each query reads only positions
up to its own); the accepted rows equal the eager pass (causal attention).
Sampled requests draft eagerly: their drafts are drawn with each request's own generator.
"""

from __future__ import annotations

import logging

import torch

from glmserve.engine.attention.context import ForwardContext, SeqChunk
from glmserve.engine.cuda_graphs import (
    CudaGraphRunner, StaticDecodeInputs, bucket_for, graph_unsafe_reason, grow_rope_tables,
)

logger = logging.getLogger(__name__)


class DraftGraphRunner(CudaGraphRunner):
    """The greedy draft chain of the MTP layer `mtp`, captured per bucket (see the module docstring)."""

    def __init__(self, mtp: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, max_batch_size: int,
                 max_model_len: int, device: torch.device, num_speculative_tokens: int, hidden_size: int,
                 dtype: torch.dtype, capture_sizes: tuple[int, ...] = ()):
        k = num_speculative_tokens
        super().__init__(mtp, kv_caches, block_size, max_batch_size, max_model_len, device,
                         capture_sizes=capture_sizes, tokens_per_seq=k + 1)
        self.k = k
        rows, blocks = self.inputs.max_batch_size, self.inputs.max_blocks_per_seq
        # One set of one-token inputs per chained step (each writes its own positions' KV).
        self.chain = [StaticDecodeInputs(rows, blocks, block_size, self.device) for _ in range(k - 1)]
        self.prev_hidden = torch.zeros(rows * (k + 1), hidden_size, dtype=dtype, device=self.device)
        self.last_row = torch.arange(rows, dtype=torch.int64, device=self.device) * (k + 1)

    def _forward(self, bucket: int, ctx: ForwardContext) -> torch.Tensor:
        m = bucket * (self.k + 1)
        h = self.model(self.inputs.input_ids[:m], ctx.positions, self.prev_hidden[:m], ctx)
        h = h[self.last_row[:bucket]]
        tok = self.model.compute_logits(h).argmax(dim=-1)
        drafts = [tok]
        for inputs in self.chain:
            step = inputs.context(bucket, self.kv_caches, self.host_seq_len)
            h = self.model(tok, step.positions, h, step)
            tok = self.model.compute_logits(h).argmax(dim=-1)
            drafts.append(tok)
        return torch.stack(drafts, dim=1)

    def fill_drafts(self, seqs: list[SeqChunk], input_ids: list[int], hidden: torch.Tensor,
                    accepted: list[int], bucket: int) -> None:
        """seqs: each sequence's verify positions (SeqChunk(blocks, start, k + 1)); input_ids: the MTP inputs
        there (the token after each position, anything past the accepted ones); hidden: the target's hidden
        states of those positions [n * (k + 1), H]; accepted[i]: drafts sequence i accepted (its last final
        position is start + accepted[i])."""
        n, q = len(seqs), self.k + 1
        self.inputs.fill(input_ids, seqs, bucket)
        self.prev_hidden[: n * q].copy_(hidden)
        rows = [i * q + a for i, a in enumerate(accepted)] + [i * q for i in range(n, bucket)]
        self.last_row[:bucket].copy_(torch.tensor(rows, dtype=torch.int64))
        zeros = [0] * n  # chained steps take their tokens from the graph itself
        for step, inputs in enumerate(self.chain, start=1):
            inputs.fill(zeros, [SeqChunk(s.block_ids, s.num_cached + a + step, 1) for s, a in zip(seqs, accepted)],
                        bucket)

    def draft(self, seqs: list[SeqChunk], input_ids: list[int], hidden: torch.Tensor,
              accepted: list[int]) -> list[list[int]]:
        """The k greedy drafts of each sequence (fill_drafts' arguments), by one replay."""
        bucket = bucket_for(len(seqs), self.sizes)
        self.fill_drafts(seqs, input_ids, hidden, accepted, bucket)
        self.graphs[bucket].replay()
        self.num_replays += 1
        return self.outputs[bucket][: len(seqs)].tolist()

    def can_run(self, seqs: list[SeqChunk]) -> bool:
        # the chained steps reach k - 1 positions past the pass at most
        limit = self.inputs.max_blocks_per_seq * self.inputs.block_size
        return super().can_run(seqs) and all(s.num_cached + 2 * self.k <= limit for s in seqs)


class SpecDecodeGraphs:
    """The verify and draft captures of one engine (k drafts per step)."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 num_speculative_tokens: int, max_batch_size: int, max_model_len: int, device: torch.device,
                 dtype: torch.dtype, capture_sizes: tuple[int, ...] = ()):
        k = num_speculative_tokens
        self.model, self.k, self.device = model, k, torch.device(device)
        # Every position a step may write: drafts go up to k past the context limit's last token.
        self.max_len = max_model_len + k
        self.verify = CudaGraphRunner(model, kv_caches, block_size, max_batch_size, self.max_len, device,
                                      capture_sizes=capture_sizes, tokens_per_seq=k + 1)
        self.draft = DraftGraphRunner(model.mtp, kv_caches, block_size, max_batch_size, self.max_len, device, k,
                                      model.cfg.hidden_size, dtype, capture_sizes)

    def capture(self) -> None:
        grow_rope_tables(self.model, self.max_len, self.device)  # the MTP layer shares the model's table
        self.verify.capture()
        self.draft.capture()

    def stats(self) -> dict:
        return {"enabled": True, "verify": {**self.verify.stats.as_dict(), "num_replays": self.verify.num_replays},
                "draft": {**self.draft.stats.as_dict(), "num_replays": self.draft.num_replays}}


def build_spec_graphs(engine, k: int) -> tuple[SpecDecodeGraphs | None, str | None]:
    """The captured graphs of an MTP engine, or (None, why not) when its config, device, backend or a
    failed capture rule them out (then every step runs eagerly)."""
    cfg = engine.cfg
    max_batch = min(cfg.cuda_graph_max_batch_size, cfg.scheduler.max_num_seqs)
    if not cfg.enable_cuda_graph or max_batch <= 0:
        return None, "disabled by configuration"
    model, runner = engine.loaded.model, engine.runner
    reason = graph_unsafe_reason(model, runner.backend, engine.device, tokens_per_seq=k + 1)
    if reason is not None:
        return None, reason
    graphs = SpecDecodeGraphs(model, runner.kv_caches, runner.block_size, k, max_batch, engine.max_model_len,
                              engine.device, engine.loaded.dtype, cfg.cuda_graph_capture_sizes)
    try:
        graphs.capture()
    except RuntimeError as e:  # e.g. an op that syncs: run eagerly, and say why in the stats
        logger.warning("CUDA graph capture of the MTP verify/draft steps failed, they run eagerly: %s", e)
        return None, f"capture failed: {e}"
    return graphs, None
