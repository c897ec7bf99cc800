"""Fused MoE (sort by expert + grouped GEMM with SwiGLU) against the per-expert loop."""

import pytest
import torch

from glmserve.kernels.fused_moe import fused_moe, fused_moe_ref, moe_align

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def routing(num_tokens, num_experts, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=g)
    return ids.to(DEVICE), (weights / weights.sum(-1, keepdim=True)).to(DEVICE)


def test_moe_align_groups_rows_by_expert():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]], device=DEVICE)
    rows, tile_expert, num_padded = moe_align(ids, num_experts=5, block_m=4)
    # expert 0: rows 1, 4 | expert 2: rows 0, 2, 5 | expert 3: row 3; each padded to 4 with sentinel 6.
    assert int(num_padded) == 12
    assert rows[:12].tolist() == [1, 4, 6, 6, 0, 2, 5, 6, 3, 6, 6, 6]
    assert tile_expert[:3].tolist() == [0, 2, 3]
    assert (tile_expert[3:] == -1).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
@pytest.mark.parametrize("num_tokens", [3, 37])
def test_fused_moe_matches_reference(dtype, tol, num_tokens):
    torch.manual_seed(0)
    hidden_size, inter, experts, top_k = 48, 40, 6, 2  # not multiples of the tiles: masks matter
    x = torch.randn(num_tokens, hidden_size, device=DEVICE).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden_size, device=DEVICE) / hidden_size**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden_size, inter, device=DEVICE) / inter**0.5).to(dtype)
    ids, weights = routing(num_tokens, experts, top_k, seed=num_tokens)
    ref = fused_moe_ref(x, weights, ids, w13, w2)
    out = fused_moe(x, weights, ids, w13, w2, block_n=32, block_k=32)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_fused_moe_plugs_into_the_engine_moe():
    from glmserve.engine.models.moe import experts_reference

    torch.manual_seed(1)
    x = torch.randn(9, 32, device=DEVICE)
    w13 = torch.randn(4, 2 * 16, 32, device=DEVICE) / 6
    w2 = torch.randn(4, 32, 16, device=DEVICE) / 4
    ids, weights = routing(9, 4, 3, seed=3)
    torch.testing.assert_close(fused_moe(x, weights, ids, w13, w2), experts_reference(x, weights, ids, w13, w2),
                               atol=1e-4, rtol=1e-4)
