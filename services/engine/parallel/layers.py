"""Tensor-parallel layers. Column-parallel linears need no class: a plain `Linear` with this rank's output
rows (sharding.py says which). What needs communication lives here:

- RowParallelLinear: input columns split, partial products summed across ranks (the one all-reduce of an
  attention or MLP block); the bias is added once, after the sum. `reduce=False` leaves the partial sum
  to the caller (the MoE sums routed and shared experts first, then reduces once).
- VocabParallelEmbedding: vocabulary rows split; each rank embeds the ids it holds, zeros elsewhere, and
  the all-reduce assembles the rows.
- gather_logits: the LM head's vocabulary slices concatenated, padding dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.engine.models.layers import Linear, SwiGLUMLP
from glmserve.engine.parallel import sharding
from glmserve.engine.parallel.parallel_state import ParallelState, divide


class RowParallelLinear(Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, st: ParallelState, reduce: bool = True):
        super().__init__(in_features, out_features, bias=bias)  # in_features: this rank's columns
        self.st = st
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.st.is_parallel:
            return super().forward(x)
        if self.fp8_gemm is not None:
            y = self.fp8_gemm(x, self.weight, self.weight_scale, None)
        else:
            y = F.linear(x, self.weight)
        if self.reduce:
            self.st.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Same parameter name (`weight`) as nn.Embedding, so checkpoints load and LM heads tie as before."""

    def __init__(self, vocab_size: int, hidden_size: int, st: ParallelState):
        super().__init__()
        self.st = st
        self.start, self.count, rows = sharding.vocab(vocab_size, st)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.st.is_parallel:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.count)
        out = F.embedding(local.clamp(0, max(self.count - 1, 0)), self.weight)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        return self.st.all_reduce(out)


def gather_logits(local: torch.Tensor, vocab_size: int, st: ParallelState) -> torch.Tensor:
    """[N, V] from every rank's [N, V_padded / TP] slice."""
    if not st.is_parallel:
        return local
    return st.all_gather_last_dim(local)[..., :vocab_size]


class ParallelSwiGLUMLP(SwiGLUMLP):
    """SwiGLU MLP (dense layers, shared experts) with gate/up rows and down columns split across ranks.
    `intermediate_size` is the full size; reduce=False returns this rank's partial sum."""

    def __init__(self, hidden_size: int, intermediate_size: int, st: ParallelState, reduce: bool = True):
        local = divide(intermediate_size, st.size, "the MLP intermediate size")
        super().__init__(hidden_size, local)
        self.down_proj = RowParallelLinear(local, hidden_size, False, st, reduce=reduce)
