"""RMSNorm + residual, RoPE (partial NeoX, interleaved) and the top-k/top-p filter vs their references."""

import pytest
import torch

from glmserve.kernels.rmsnorm import rmsnorm_residual, rmsnorm_residual_ref
from glmserve.kernels.rope import rope, rope_ref
from glmserve.kernels.sampling import top_k_top_p_filter, top_k_top_p_filter_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3)]


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_rmsnorm_residual(dtype, tol, with_residual):
    torch.manual_seed(0)
    x = torch.randn(5, 40, device=DEVICE).to(dtype)
    res = torch.randn(5, 40, device=DEVICE).to(dtype) if with_residual else None
    w = (1 + torch.randn(40, device=DEVICE) / 10).to(dtype)
    out, new_res = rmsnorm_residual(x, res, w, 1e-6)
    ref, ref_res = rmsnorm_residual_ref(x, res, w, 1e-6)
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_rmsnorm_matches_engine_layer():
    from glmserve.engine.models.layers import RMSNorm

    torch.manual_seed(1)
    layer = RMSNorm(24, 1e-5)
    layer.weight.data = torch.randn(24)
    x = torch.randn(3, 24)
    torch.testing.assert_close(rmsnorm_residual(x, None, layer.weight, 1e-5)[0], layer(x))


def cos_sin(num_tokens, rotary_dim, dtype):
    pos = torch.arange(7, 7 + num_tokens, device=DEVICE).float()
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=DEVICE).float() / rotary_dim))
    f = pos[:, None] * inv
    return f.cos().to(dtype), f.sin().to(dtype)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("interleaved,head_dim,rotary_dim", [(False, 32, 16), (False, 24, 24), (True, 16, 16), (True, 20, 12)])
def test_rope(dtype, tol, interleaved, head_dim, rotary_dim):
    torch.manual_seed(2)
    x = torch.randn(4, 3, head_dim, device=DEVICE).to(dtype)
    cos, sin = cos_sin(4, rotary_dim, dtype)
    torch.testing.assert_close(rope(x, cos, sin, rotary_dim, interleaved), rope_ref(x, cos, sin, rotary_dim, interleaved),
                               atol=tol, rtol=tol)


def test_rope_matches_engine_rotations_and_keeps_the_pass_through_dims():
    from glmserve.engine.models.rope import rotate_interleaved, rotate_neox

    torch.manual_seed(3)
    cos, sin = cos_sin(5, 8, torch.float32)
    x = torch.randn(5, 2, 8, device=DEVICE)
    torch.testing.assert_close(rope(x, cos, sin, 8, True), rotate_interleaved(x, cos[:, None], sin[:, None]))
    torch.testing.assert_close(rope(x, cos, sin, 8, False), rotate_neox(x, cos[:, None], sin[:, None]))
    k = torch.randn(5, 8, device=DEVICE)  # MLA's shared k_rope has no head dim
    torch.testing.assert_close(rope(k, cos, sin, 8, True), rotate_interleaved(k, cos, sin))
    # Partial rotary on a strided view (a split of a fused projection): the tail is copied as is.
    fused = torch.randn(5, 2, 24, device=DEVICE)
    view = fused[..., :16]
    out = rope(view, cos, sin, 8, False)
    torch.testing.assert_close(out[..., 8:], view[..., 8:], atol=0, rtol=0)
    torch.testing.assert_close(out, rotate_neox(view, cos[:, None], sin[:, None]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_top_k_top_p_filter(dtype):
    torch.manual_seed(4)
    vocab = 300
    logits = (torch.randn(6, vocab, device=DEVICE) * 3).to(dtype)
    top_k = torch.tensor([0, 1, 5, 50, 300, 20])
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 0.3, 0.95])
    out = top_k_top_p_filter(logits, top_k, top_p, block_v=128)  # several tiles per row
    ref = top_k_top_p_filter_ref(logits, top_k, top_p)
    assert torch.equal(out.isinf(), ref.isinf())
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    kept = (~ref.isinf()).sum(-1).tolist()
    assert kept[0] == vocab and kept[1] == 1 and kept[2] == 5 and 1 <= kept[3] < 50


def test_top_k_top_p_handles_negative_logits_and_ties():
    logits = torch.tensor([[-3.0, -1.0, -2.0, -1.0, -5.0]], device=DEVICE)
    out = top_k_top_p_filter(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert (~out.isinf()).tolist() == [[False, True, False, True, False]]
    out = top_k_top_p_filter(logits, torch.tensor([3]), torch.tensor([1.0]))
    assert (~out.isinf()).tolist() == [[False, True, True, True, False]]
