"""Fused MoE experts: tokens sorted by expert, then two grouped GEMMs (gate/up with SwiGLU fused, down).

Inputs follow the engine's MoE (`glmserve.engine.models.moe`): hidden [T, H], topk_weights [T, k],
topk_ids [T, k], w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I]. The signature matches
`MoE.experts_fn`, so `fused_moe` plugs in there.

Every (token, slot) pair is one row. `moe_align` sorts the T*k rows by expert and pads each expert's
run to a multiple of BLOCK_M, so every BLOCK_M tile of the sorted order belongs to exactly one expert.
It works with tensor ops only (no host sync): the padded length is bounded by T*k + E*(BLOCK_M-1), the
grid is sized by that bound, and tiles past the real end exit at once (CUDA-graph friendly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def fused_moe_ref(
    hidden: torch.Tensor,  # [T, H]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:
    """One expert at a time, in fp32: the plainest statement of what the kernel computes."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in range(w13.shape[0]):
        token, slot = (topk_ids == expert).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        gate, up = F.linear(hidden[token].float(), w13[expert].float()).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert].float())
        out.index_add_(0, token, y * topk_weights[token, slot].float().unsqueeze(-1))
    return out.to(hidden.dtype)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_rows [P], tile_expert [P / block_m], num_rows_padded [1]).

    sorted_rows lists flat row ids (token * k + slot) grouped by expert, each group padded with the
    sentinel T*k to a multiple of block_m; tile_expert gives each tile's expert (-1 past the end).
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_rows = flat.numel()
    # Not torch.bincount: on CUDA it reads the max id back to the host (a sync, fatal in CUDA graph capture).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    start = counts.cumsum(0) - counts
    order = flat.argsort(stable=True)
    expert_of = flat[order]
    rank = torch.arange(num_rows, device=flat.device) - start[expert_of]
    capacity = num_rows + num_experts * (block_m - 1)
    capacity = (capacity + block_m - 1) // block_m * block_m
    sorted_rows = torch.full((capacity,), num_rows, dtype=torch.int64, device=flat.device)
    sorted_rows[padded_start[expert_of] + rank] = order
    tile_start = torch.arange(0, capacity, block_m, device=flat.device)
    tile_expert = torch.searchsorted(padded_end, tile_start, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1)
    return sorted_rows, tile_expert, padded_end[-1:]


@triton.jit
def _moe_gate_up_kernel(
    hidden_ptr, w13_ptr, act_ptr,
    sorted_rows_ptr, tile_expert_ptr, num_padded_ptr,
    num_rows, hidden_size, inter_size,
    stride_ht, stride_we, stride_wn, stride_at,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """act[row, n] = silu(x . w_gate[n]) * (x . w_up[n]) for the rows of one expert tile."""
    tile = tl.program_id(0)
    if tile * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    rows = tl.load(sorted_rows_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < num_rows
    token = rows // TOP_K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < inter_size
    w_gate = w13_ptr + expert * stride_we + n[None, :] * stride_wn
    w_up = w_gate + inter_size * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < hidden_size
        x = tl.load(hidden_ptr + token[:, None] * stride_ht + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_gate + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(w_up + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        gate = tl.dot(x, wg, gate, input_precision="ieee")
        up = tl.dot(x, wu, up, input_precision="ieee")
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(act_ptr + rows[:, None] * stride_at + n[None, :], act.to(act_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_down_kernel(
    act_ptr, w2_ptr, out_ptr, weights_ptr,
    sorted_rows_ptr, tile_expert_ptr, num_padded_ptr,
    num_rows, hidden_size, inter_size,
    stride_at, stride_we, stride_wn, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[row, n] = routing_weight[row] * (act[row] . w2[expert, n])."""
    tile = tl.program_id(0)
    if tile * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    rows = tl.load(sorted_rows_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < num_rows
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden_size
    w = w2_ptr + expert * stride_we + n[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < inter_size
        a = tl.load(act_ptr + rows[:, None] * stride_at + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    weight = tl.load(weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


def _block_m(num_rows: int, num_experts: int) -> int:
    # Few rows per expert (decode) waste most of a big tile on padding; many rows amortise the weights.
    per_expert = num_rows / max(num_experts, 1)
    return 16 if per_expert <= 16 else (32 if per_expert <= 64 else 64)


def fused_moe(
    hidden: torch.Tensor,  # [T, H]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:  # [T, H]
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter_size = two_inter // 2
    top_k = topk_ids.shape[1]
    num_rows = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
    block_m = block_m or _block_m(num_rows, num_experts)
    sorted_rows, tile_expert, num_padded = moe_align(topk_ids, num_experts, block_m)
    num_tiles = tile_expert.shape[0]

    act = hidden.new_empty(num_rows, inter_size)
    bn1 = min(block_n, max(16, triton.next_power_of_2(inter_size)))
    bk1 = min(block_k, max(16, triton.next_power_of_2(hidden_size)))
    _moe_gate_up_kernel[(num_tiles, triton.cdiv(inter_size, bn1))](
        hidden, w13, act, sorted_rows, tile_expert, num_padded,
        num_rows, hidden_size, inter_size,
        hidden.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=bn1, BLOCK_K=bk1,
    )
    # One output row per (token, slot); summing the k slots afterwards keeps the result deterministic.
    per_slot = hidden.new_empty(num_rows, hidden_size)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    bn2 = min(block_n, max(16, triton.next_power_of_2(hidden_size)))
    bk2 = min(block_k, max(16, triton.next_power_of_2(inter_size)))
    _moe_down_kernel[(num_tiles, triton.cdiv(hidden_size, bn2))](
        act, w2, per_slot, weights, sorted_rows, tile_expert, num_padded,
        num_rows, hidden_size, inter_size,
        act.stride(0), w2.stride(0), w2.stride(1), per_slot.stride(0),
        BLOCK_M=block_m, BLOCK_N=bn2, BLOCK_K=bk2,
    )
    return per_slot.view(num_tokens, top_k, hidden_size).sum(dim=1, dtype=torch.float32).to(hidden.dtype)
