"""FP8 (e4m3) GEMMs: per-token activation scales times per-output-channel weight scales.

    C[m, n] = (sum_k A8[m, k] * W8[n, k]) * a_scale[m] * w_scale[n]  (+ bias[n])

A8 comes from `quantize_per_token` (dynamic, one scale per row), W8 is a compressed-tensors FP8 weight
[N, K] kept as stored. Both scales are constant along k, so they multiply the fp32 accumulator once,
after the loop. Two users:
- `fp8_gemm`: a dense GEMM for Linear layers (the fallback when torch._scaled_mm cannot run).
- `fp8_fused_moe`: the experts, laid out as in fused_moe.py (rows sorted by expert with `moe_align`,
  gate/up GEMM with SwiGLU fused, then the down GEMM), with the SwiGLU output re-quantized per row
  between the two.

FP8 tensor-core dots need compute capability >= 8.9; Triton's interpreter runs them on CPU (tests).
No host syncs anywhere (the MoE reuses moe_align's device-side bounds), so both are CUDA-graph safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from glmserve.kernels.fused_moe import moe_align

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Rows of all zeros get this scale instead of 0, so dequantizing them gives 0 rather than NaN.
_MIN_SCALE = 1e-12


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x8 [M, K] float8_e4m3fn, scale [M] fp32) with M = x.numel() // K, x ~= x8 * scale."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    scale = (x2.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
    x8 = (x2 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, scale


def fp8_gemm_ref(a8: torch.Tensor, a_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize both sides and multiply in fp32: what every FP8 GEMM here must compute."""
    a = a8.float() * a_scale.float().reshape(-1, 1)
    w = w8.float() * w_scale.float().reshape(-1, 1)
    out = a @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, w_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
    M, N, K, stride_am, stride_wn, stride_cm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row tiles walk the columns together, so W tiles are reused from L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        a = tl.load(a_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        # Hopper's FP8 MMA accumulates with ~14-bit precision and Triton never promotes by default there:
        # promote to the fp32 accumulator every tile (as DeepSeek-V3's FP8 GEMMs do), else K=2048 costs 1e-2.
        acc = tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K)
    a_s = tl.load(a_scale_ptr + rm, mask=m_ok, other=0.0)
    w_s = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)
    acc = acc * a_s[:, None] * w_s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _block_m(m: int) -> int:
    # Decode batches are a few rows: a 16-row tile (tl.dot's minimum) wastes least.
    return 16 if m <= 16 else (32 if m <= 32 else (64 if m <= 64 else 128))


def fp8_gemm(a8: torch.Tensor, a_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
             block_n: int = 128, block_k: int = 128) -> torch.Tensor:
    """Triton version of `fp8_gemm_ref`: a8 [M, K] fp8, a_scale [M], w8 [N, K] fp8, w_scale [N] -> [M, N]."""
    m, k = a8.shape
    n, k_w = w8.shape
    assert k == k_w, f"K mismatch: {k} vs {k_w}"
    a8 = a8 if a8.stride(-1) == 1 else a8.contiguous()
    w8 = w8 if w8.stride(-1) == 1 else w8.contiguous()
    a_scale = a_scale.reshape(-1).float().contiguous()
    w_scale = w_scale.reshape(-1).float().contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=a8.device)
    if m == 0:
        return out
    bm = _block_m(m)
    bn = min(block_n, max(16, triton.next_power_of_2(n)))
    bk = min(block_k, max(32, triton.next_power_of_2(k)))
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8_gemm_kernel[grid](
        a8, w8, out, a_scale, w_scale, bias if bias is not None else w_scale,
        m, n, k, a8.stride(0), w8.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
    )
    return out


# -- experts ------------------------------------------------------------------------------------------

def fp8_fused_moe_ref(
    hidden: torch.Tensor,  # [T, H]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    w13: torch.Tensor,  # [E, 2I, H] fp8
    w2: torch.Tensor,  # [E, H, I] fp8
    w13_scale: torch.Tensor,  # [E, 2I] fp32
    w2_scale: torch.Tensor,  # [E, H] fp32
) -> torch.Tensor:
    """Expert by expert in fp32 on dequantized operands, quantizing exactly where the kernels do: the
    input per token, the SwiGLU output (rounded to hidden's dtype first) per (token, slot) row."""
    x8, xs = quantize_per_token(hidden)
    x = x8.float() * xs[:, None]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in range(w13.shape[0]):
        token, slot = (topk_ids == expert).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        w_gu = w13[expert].float() * w13_scale[expert].float()[:, None]
        gate, up = F.linear(x[token], w_gu).chunk(2, dim=-1)
        act8, acts = quantize_per_token((F.silu(gate) * up).to(hidden.dtype))
        w_d = w2[expert].float() * w2_scale[expert].float()[:, None]
        y = F.linear(act8.float() * acts[:, None], w_d)
        out.index_add_(0, token, y * topk_weights[token, slot].float().unsqueeze(-1))
    return out.to(hidden.dtype)


@triton.jit
def _fp8_moe_gate_up_kernel(
    x_ptr, x_scale_ptr, w13_ptr, w13_scale_ptr, act_ptr,
    sorted_rows_ptr, tile_expert_ptr, num_padded_ptr,
    num_rows, hidden_size, inter_size,
    stride_xt, stride_we, stride_wn, stride_se, stride_at,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """act[row, n] = silu(gate) * up with gate = (x8 . wg8[n]) * xs * sg[n], up likewise."""
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
        x = tl.load(x_ptr + token[:, None] * stride_xt + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_gate + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(w_up + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        gate = tl.dot(x, wg, gate, max_num_imprecise_acc=BLOCK_K)  # per-tile fp32 promotion, as in fp8_gemm
        up = tl.dot(x, wu, up, max_num_imprecise_acc=BLOCK_K)
    xs = tl.load(x_scale_ptr + token, mask=row_ok, other=0.0)
    scales = w13_scale_ptr + expert * stride_se
    gate = gate * xs[:, None] * tl.load(scales + n, mask=n_ok, other=0.0)[None, :]
    up = up * xs[:, None] * tl.load(scales + inter_size + n, mask=n_ok, other=0.0)[None, :]
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(act_ptr + rows[:, None] * stride_at + n[None, :], act.to(act_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _fp8_moe_down_kernel(
    a_ptr, a_scale_ptr, w2_ptr, w2_scale_ptr, out_ptr, weights_ptr,
    sorted_rows_ptr, tile_expert_ptr, num_padded_ptr,
    num_rows, hidden_size, inter_size,
    stride_at, stride_we, stride_wn, stride_se, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[row, n] = routing_weight[row] * (a8[row] . w8[expert, n]) * as[row] * s[expert, n]."""
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
        a = tl.load(a_ptr + rows[:, None] * stride_at + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)  # per-tile fp32 promotion, as in fp8_gemm
    a_s = tl.load(a_scale_ptr + rows, mask=row_ok, other=0.0)
    w_s = tl.load(w2_scale_ptr + expert * stride_se + n, mask=n_ok, other=0.0)
    routing = tl.load(weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * (a_s * routing)[:, None] * w_s[None, :]
    tl.store(out_ptr + rows[:, None] * stride_ot + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


def _moe_block_m(num_rows: int, num_experts: int) -> int:
    per_expert = num_rows / max(num_experts, 1)
    return 16 if per_expert <= 16 else (32 if per_expert <= 64 else 64)


def fp8_fused_moe(
    hidden: torch.Tensor,  # [T, H] bf16/fp16/fp32
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    w13: torch.Tensor,  # [E, 2I, H] fp8
    w2: torch.Tensor,  # [E, H, I] fp8
    w13_scale: torch.Tensor,  # [E, 2I] fp32
    w2_scale: torch.Tensor,  # [E, H] fp32
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 128,
) -> torch.Tensor:  # [T, H] in hidden's dtype
    """Triton version of `fp8_fused_moe_ref` (same arguments as fused_moe plus the two scale tensors)."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter_size = two_inter // 2
    top_k = topk_ids.shape[1]
    num_rows = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
    w13_scale = w13_scale.reshape(num_experts, two_inter).float().contiguous()
    w2_scale = w2_scale.reshape(num_experts, hidden_size).float().contiguous()
    block_m = block_m or _moe_block_m(num_rows, num_experts)
    sorted_rows, tile_expert, num_padded = moe_align(topk_ids, num_experts, block_m)
    num_tiles = tile_expert.shape[0]

    x8, xs = quantize_per_token(hidden)
    act = hidden.new_empty(num_rows, inter_size)
    bn1 = min(block_n, max(16, triton.next_power_of_2(inter_size)))
    bk1 = min(block_k, max(32, triton.next_power_of_2(hidden_size)))
    _fp8_moe_gate_up_kernel[(num_tiles, triton.cdiv(inter_size, bn1))](
        x8, xs, w13, w13_scale, act, sorted_rows, tile_expert, num_padded,
        num_rows, hidden_size, inter_size,
        x8.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), act.stride(0),
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=bn1, BLOCK_K=bk1,
    )
    a8, a_scale = quantize_per_token(act)
    per_slot = hidden.new_empty(num_rows, hidden_size)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    bn2 = min(block_n, max(16, triton.next_power_of_2(hidden_size)))
    bk2 = min(block_k, max(32, triton.next_power_of_2(inter_size)))
    _fp8_moe_down_kernel[(num_tiles, triton.cdiv(hidden_size, bn2))](
        a8, a_scale, w2, w2_scale, per_slot, weights, sorted_rows, tile_expert, num_padded,
        num_rows, hidden_size, inter_size,
        a8.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), per_slot.stride(0),
        BLOCK_M=block_m, BLOCK_N=bn2, BLOCK_K=bk2,
    )
    return per_slot.view(num_tokens, top_k, hidden_size).sum(dim=1, dtype=torch.float32).to(hidden.dtype)
