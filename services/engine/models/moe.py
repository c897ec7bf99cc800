"""GLM MoE: sigmoid group-limited router + SwiGLU experts + shared experts (docs/MODELS.md §4).

The router's correction bias only chooses experts; the weights come from the unbiased sigmoid scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.engine.config import ModelConfig
from glmserve.engine.parallel import parallel_state, sharding
from glmserve.engine.parallel.layers import ParallelSwiGLUMLP


def route(
    router_logits: torch.Tensor,  # [T, E] fp32
    correction_bias: torch.Tensor,  # [E] fp32
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, k] fp32, topk_ids [T, k] int64)."""
    scores = router_logits.sigmoid()
    biased = scores + correction_bias
    n_tokens, n_experts = biased.shape
    if n_group > 1:
        per_group = biased.view(n_tokens, n_group, n_experts // n_group)
        group_scores = per_group.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        keep_groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(per_group).reshape(n_tokens, n_experts)
        biased = biased.masked_fill(~expert_mask, float("-inf"))
    topk_ids = biased.topk(top_k, dim=-1, sorted=False).indices
    topk_weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * routed_scaling_factor, topk_ids


def experts_reference(
    x: torch.Tensor,  # [T, H]
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k]
    w13: torch.Tensor,  # [E, 2I, H] gate rows then up rows
    w2: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:
    """Tokens grouped by expert, one GEMM pair per expert that was hit."""
    out = torch.zeros_like(x)
    flat_ids = topk_ids.reshape(-1)
    order = flat_ids.argsort(stable=True)
    token_of = order // topk_ids.shape[1]
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        tokens = token_of[start : start + n]
        start += n
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        weight = topk_weights.reshape(-1)[rows].unsqueeze(-1)
        out.index_add_(0, tokens, (y * weight).to(out.dtype))
    return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        # Tensor parallel: every expert's intermediate split across ranks, or (expert parallel) whole experts
        # [first_expert, first_expert + local) on this rank; either way one all-reduce sums the partial outputs.
        self.parallel = st = parallel_state.current()
        self.first_expert, local = sharding.experts(e, st)
        local_i = sharding.expert_intermediate(cfg, st)
        self.gate_weight = nn.Parameter(torch.empty(e, h), requires_grad=False)  # router, kept fp32
        self.e_score_correction_bias = nn.Parameter(torch.zeros(e), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(local, 2 * local_i, h), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(local, h, local_i), requires_grad=False)
        self.shared_experts = (ParallelSwiGLUMLP(h, i * cfg.n_shared_experts, st, reduce=False)
                               if cfg.n_shared_experts > 0 else None)
        # Swappable expert implementation (the fused Triton MoE kernel plugs in here).
        self.experts_fn = experts_reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        logits = F.linear(x.float(), self.gate_weight.float())
        weights, ids = route(
            logits, self.e_score_correction_bias.float(), c.num_experts_per_tok, c.n_group, c.topk_group,
            c.norm_topk_prob, c.routed_scaling_factor,
        )
        if self.parallel.expert_parallel:
            weights, ids = self.local_routes(weights, ids)
        out = self.experts_fn(x, weights, ids, self.w13, self.w2)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.parallel.all_reduce(out)

    def local_routes(self, weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routes to this rank's experts, renumbered from 0; the others get weight 0 on local expert 0, so
        every experts_fn (reference or fused kernel) runs unchanged and adds exactly nothing for them."""
        local = ids - self.first_expert
        mine = (local >= 0) & (local < self.w13.shape[0])
        return weights * mine, torch.where(mine, local, torch.zeros_like(local))
