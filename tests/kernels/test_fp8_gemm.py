"""FP8 GEMMs: per-token quantization, the dequantized reference against fp32, and the Triton kernels
(dense and grouped MoE) against the reference. On CPU the kernels run under Triton's interpreter, which
executes fp8 dots (conftest.py switches it on); the GPU tests repeat them at GLM shapes on real FP8
tensor cores and check torch._scaled_mm's row-wise path."""

import pytest
import torch

from glmserve.kernels.fp8_gemm import (
    FP8_DTYPE, FP8_MAX, fp8_fused_moe, fp8_fused_moe_ref, fp8_gemm, fp8_gemm_ref, quantize_per_token,
)
from glmserve.kernels.fused_moe import fused_moe_ref

HAS_CUDA = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def skip_without_fp8_cores():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (sm89+)")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8 of w [..., N, K], as compressed-tensors stores it."""
    scale = w.abs().amax(dim=-1) / FP8_MAX
    return (w / scale[..., None]).to(FP8_DTYPE), scale


def test_per_token_quantization_roundtrip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 256, generator=g) * torch.tensor([1e-3, 1.0, 10.0, 300.0, 1.0, 1.0])[:, None]
    x[4] = 0.0  # an all-zero row must stay zero, not NaN
    x8, s = quantize_per_token(x)
    assert x8.dtype == FP8_DTYPE and s.shape == (6,)
    back = x8.float() * s[:, None]
    assert torch.isfinite(back).all() and (back[4] == 0).all()
    # Each row's largest magnitude maps to +-448 exactly; e4m3 keeps 3 mantissa bits, so normal values are
    # within 2^-4 relative; the smallest ones (subnormal range) within half of e4m3's smallest step.
    for r in (0, 1, 2, 3, 5):
        assert x8[r].float().abs().max() == FP8_MAX
        err = (back[r] - x[r]).abs()
        assert (err <= x[r].abs() * 2**-4 + s[r] * 2**-10).all()


def test_dequantized_gemm_matches_fp32_within_fp8_tolerance():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(33, 512, generator=g)
    w = torch.randn(192, 512, generator=g) * torch.linspace(0.01, 2.0, 192)[:, None]  # channels of all sizes
    bias = torch.randn(192, generator=g)
    a8, a_s = quantize_per_token(a)
    w8, w_s = quantize_weight(w)
    ref = a @ w.t() + bias
    out = fp8_gemm_ref(a8, a_s, w8, w_s, bias, out_dtype=torch.float32)
    # e4m3 rounds each operand by ~2.6% RMS (3 mantissa bits); the product errors add up in quadrature.
    assert rel_err(out, ref) < 0.05
    # and it is really an 8-bit product: far from exact
    assert rel_err(out, ref) > 1e-3


@pytest.mark.parametrize("m,n,k", [(5, 72, 200), (130, 96, 256)])
def test_triton_fp8_gemm_matches_reference(m, n, k):
    g = torch.Generator().manual_seed(m)
    a8, a_s = quantize_per_token(torch.randn(m, k, generator=g))
    w8, w_s = quantize_weight(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g)
    ref = fp8_gemm_ref(a8, a_s, w8, w_s, bias, out_dtype=torch.float32)
    out = fp8_gemm(a8, a_s, w8, w_s, bias, out_dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def moe_inputs(t, h, i, e, k, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h**0.5
    w2 = torch.randn(e, h, i, generator=g) / i**0.5
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), weights.to(**to), ids.to(**to), w13.to(dtype=dtype, **to),
            w2.to(dtype=dtype, **to))


def test_fp8_moe_reference_matches_unquantized_experts():
    x, wts, ids, w13, w2 = moe_inputs(t=12, h=64, i=32, e=6, k=2, seed=3)
    w13_8, s13 = quantize_weight(w13)
    w2_8, s2 = quantize_weight(w2)
    ref = fused_moe_ref(x, wts, ids, w13, w2)
    out = fp8_fused_moe_ref(x, wts, ids, w13_8, w2_8, s13, s2)
    # Four roundings (input, gate/up weights, SwiGLU output, down weights): ~5-7% RMS in all.
    assert 1e-3 < rel_err(out, ref) < 0.09


@pytest.mark.parametrize("t", [3, 40])
def test_triton_fp8_moe_matches_reference(t):
    x, wts, ids, w13, w2 = moe_inputs(t=t, h=64, i=48, e=8, k=2, seed=t)
    w13_8, s13 = quantize_weight(w13)
    w2_8, s2 = quantize_weight(w2)
    ref = fp8_fused_moe_ref(x, wts, ids, w13_8, w2_8, s13, s2)
    out = fp8_fused_moe(x, wts, ids, w13_8, w2_8, s13, s2)
    # Same FP8 operands; only the re-quantized SwiGLU output may round differently in rare elements.
    assert rel_err(out, ref) < 5e-3
    assert rel_err(out, fused_moe_ref(x, wts, ids, w13, w2)) < 0.09


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("m", [1, 64, 1000])
def test_gpu_fp8_gemm_and_scaled_mm_at_glm_shapes(m):
    skip_without_fp8_cores()
    from glmserve.engine.fp8 import fp8_linear

    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 2048, generator=g, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5120, 2048, generator=g, device="cuda") * 0.02
    w8, w_s = quantize_weight(w)
    a8, a_s = quantize_per_token(x)
    ref = fp8_gemm_ref(a8, a_s, w8, w_s, out_dtype=torch.float32)
    torch.testing.assert_close(fp8_gemm(a8, a_s, w8, w_s, out_dtype=torch.float32), ref, rtol=2e-3, atol=2e-3)
    out = fp8_linear(x, w8, w_s)  # torch._scaled_mm on sm90+, else the Triton kernel
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    assert rel_err(out, x.float() @ w.t()) < 0.05



@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("t", [1, 64, 2048])
def test_gpu_fp8_moe_at_glm47_flash_shapes(t):
    skip_without_fp8_cores()
    x, wts, ids, w13, w2 = moe_inputs(t=t, h=2048, i=1536, e=64, k=4, seed=t, device="cuda", dtype=torch.bfloat16)
    w13_8, s13 = quantize_weight(w13.float())
    w2_8, s2 = quantize_weight(w2.float())
    ref = fp8_fused_moe_ref(x, wts, ids, w13_8, w2_8, s13, s2)
    out = fp8_fused_moe(x, wts, ids, w13_8, w2_8, s13, s2)
    assert rel_err(out, ref) < 1e-2
