"""The sharding rules, without processes: which heads, experts and rows a rank holds, and clear refusals."""

from __future__ import annotations

import pytest
import torch

from glmserve.engine.config import ModelConfig
from glmserve.engine.parallel import sharding
from glmserve.engine.parallel.parallel_state import ParallelConfig, ParallelState
from glmserve.engine.parallel.sharded_weights import pad, slice_tensor
from glmserve.engine.tiny_checkpoint import write_tiny_checkpoint


def _st(rank: int, size: int, ep: bool = False) -> ParallelState:
    return ParallelState(rank=rank, size=size, expert_parallel=ep)


def test_kv_heads_split_then_replicated():
    # 8 query heads over 2 KV heads: TP 2 splits them; TP 4 and 8 give each rank the KV head of its queries.
    assert [sharding.kv_heads(8, 2, _st(r, 2)) for r in range(2)] == [(0, 1), (1, 1)]
    assert [sharding.kv_heads(8, 2, _st(r, 4)) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [sharding.kv_heads(8, 2, _st(r, 8))[0] for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="neither a divisor nor a multiple"):
        sharding.kv_heads(12, 4, _st(0, 6))
    with pytest.raises(ValueError, match="number of attention heads .6. is not divisible by the tensor-parallel size 4"):
        sharding.heads(6, _st(0, 4))


def test_vocab_slices_cover_the_vocabulary_once():
    got = [sharding.vocab(251, _st(r, 4)) for r in range(4)]
    assert [g[2] for g in got] == [63] * 4
    assert [(g[0], g[1]) for g in got] == [(0, 63), (63, 63), (126, 63), (189, 62)]


def _cfg(tmp_path) -> ModelConfig:
    from glmserve.engine.config import read_model_config

    return read_model_config(write_tiny_checkpoint("glm4_moe", tmp_path / "m")["model_dir"])


def test_fused_expert_layout_matches_per_expert_layout(tmp_path):
    """transformers' fused [E, 2I, H] / [E, H, I] expert tensors are cut to the same rows as the published
    per-expert gate/up/down tensors, for the TP split inside experts and for expert parallelism."""
    cfg = _cfg(tmp_path)
    e, i, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    gate, up, down = torch.randn(e, i, h), torch.randn(e, i, h), torch.randn(e, h, i)
    fused_13, fused_2 = torch.cat([gate, up], dim=1), down
    prefix = "model.layers.1.mlp.experts."
    for ep in (False, True):
        for rank in range(2):
            st = _st(rank, 2, ep)
            w13 = slice_tensor(fused_13, sharding.checkpoint_slice(prefix + "gate_up_proj", tuple(fused_13.shape), cfg, st))
            w2 = slice_tensor(fused_2, sharding.checkpoint_slice(prefix + "down_proj", tuple(fused_2.shape), cfg, st))
            first, count = sharding.experts(e, st)
            for local in range(count):
                per = {}
                for proj, full in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
                    sl = sharding.checkpoint_slice(f"{prefix}{first + local}.{proj}.weight", tuple(full[0].shape), cfg, st)
                    assert sl.name == f"{prefix}{local if ep else first + local}.{proj}.weight"
                    per[proj] = slice_tensor(full[first + local], sl)
                assert torch.equal(w13[local], torch.cat([per["gate_proj"], per["up_proj"]]))
                assert torch.equal(w2[local], per["down_proj"])
            if ep:  # another rank's expert is not read at all
                other = (1 - rank) * count
                assert sharding.checkpoint_slice(f"{prefix}{other}.gate_proj.weight", (i, h), cfg, st) is None


def test_padded_slice_is_zero_filled():
    sl = sharding.Slice("lm_head.weight", 0, ((189, 62),), pad_to=63)
    t = pad(torch.ones(62, 4), sl)
    assert t.shape == (63, 4) and t[62].abs().sum() == 0 and t[:62].eq(1).all()


def test_parallel_config_refuses_nonsense():
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        ParallelConfig(tensor_parallel_size=0)


def test_dummy_weights_agree_on_replicated_parameters_across_ranks(tmp_path):
    """--load-format dummy on TP ranks: norms, router and the MLA latent projections (replicated) are the
    same on every rank, so the ranks compute one model, not one each."""
    from glmserve.engine.attention.torch_backend import TorchAttentionBackend
    from glmserve.engine.loader import load_model
    from glmserve.engine.parallel.parallel_state import building_with

    model_dir = write_tiny_checkpoint("glm4_moe_lite", tmp_path / "m")["model_dir"]
    params = []
    for rank in range(2):
        with building_with(_st(rank, 2)):
            net = load_model(str(model_dir), dtype="float32", device="cpu", load_format="dummy",
                             backend=TorchAttentionBackend(), show_progress=False).model
        params.append(dict(net.named_parameters()))
    replicated = ["model.norm.weight", "model.layers.1.mlp.gate_weight", "model.layers.1.input_layernorm.weight",
                  "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    for name in replicated:
        assert torch.equal(params[0][name], params[1][name]), name
    assert not torch.equal(params[0]["model.norm.weight"], torch.ones_like(params[0]["model.norm.weight"]))
