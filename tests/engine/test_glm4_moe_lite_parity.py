"""glm4_moe_lite (GLM-4.7-Flash, MLA) against transformers' Glm4MoeLiteForCausalLM, fp32 on CPU.

A tiny random checkpoint (every parameter random, norms and the router's correction bias included;
group-limited routing with topk_group < n_group, unnormalised top-k, routed scaling != 1, a dense first
layer, 5 heads, attention bias on) goes through our loader; our model then runs the same tokens through
the paged latent cache under different step schedules and must give the reference's logits within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from glmserve.engine.attention.context import SeqChunk, build_context  # noqa: E402
from glmserve.engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from glmserve.engine.config import ModelConfig  # noqa: E402
from glmserve.engine.models.glm4_moe_lite import Glm4MoeLiteForCausalLM  # noqa: E402
from glmserve.engine.models.weight_utils import WeightLoadError  # noqa: E402
from tests.engine.hf_reference import (  # noqa: E402
    PagedRunner, hf_logits, load_hf_model, load_ours, make_checkpoint, random_tokens, run_chunks, run_steps,
)

ATOL = 1e-4
VOCAB = 128
OVERRIDES = dict(
    num_attention_heads=5, num_key_value_heads=5, attention_bias=True, routed_scaling_factor=2.5,
    n_group=4, topk_group=2, norm_topk_prob=False,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("glm4_moe_lite", tmp_path_factory.mktemp("lite"), seed=3, vocab_size=VOCAB,
                           overrides=OVERRIDES)


@pytest.fixture(scope="module")
def hf(ckpt):
    return load_hf_model(ckpt)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_ours(ckpt, with_mtp=True)  # test_mtp_layer_loaded needs the draft layer


@pytest.fixture(scope="module")
def ours(loaded):
    return loaded.model


def toks(n: int, seed: int) -> list[int]:
    return random_tokens(n, VOCAB, seed)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_config_is_the_hard_case(loaded):
    cfg = loaded.config
    assert cfg.is_mla and cfg.n_group > cfg.topk_group > 0 and not cfg.norm_topk_prob
    assert cfg.routed_scaling_factor != 1 and cfg.dense_layers[0] and not all(cfg.dense_layers)
    assert cfg.num_attention_heads & (cfg.num_attention_heads - 1) != 0 and cfg.attention_bias
    assert cfg.rope_interleave and cfg.q_lora_rank is not None and cfg.num_nextn_predict_layers == 1


def test_full_prefill(hf, ours, loaded):
    ids = toks(19, seed=1)
    close(run_chunks(ours, loaded.config, ids, [len(ids)]), hf_logits(hf, ids))


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill(hf, ours, loaded, chunk):
    ids = toks(17, seed=2)
    close(run_chunks(ours, loaded.config, ids, [chunk]), hf_logits(hf, ids))


def test_paged_decode_after_prefill(hf, ours, loaded):
    ids = toks(22, seed=3)
    close(run_chunks(ours, loaded.config, ids, [9, 1]), hf_logits(hf, ids))


def test_batch_of_different_lengths(hf, ours, loaded):
    seqs = [toks(n, seed=10 + n) for n in (5, 13, 2, 9)]
    steps = [
        [(0, 3), (1, 10), (2, 1), (3, 9)],  # prefill chunks of different lengths in one step
        [(0, 2), (1, 1), (2, 1)],  # a prefill chunk beside decode tokens
        [(1, 2)],
    ]
    got = run_steps(ours, loaded.config, seqs, steps)
    for s, g in zip(seqs, got):
        close(g, hf_logits(hf, s))


def test_prefix_cache_hit(hf, ours, loaded):
    r = PagedRunner(ours, loaded.config, block_size=4)
    a = r.add(toks(14, seed=4))
    r.step([(a, 14)])
    # b shares a's first 3 full blocks (12 tokens): those blocks are reused, only b's suffix is computed.
    b_ids = r.tokens[a][:12] + toks(6, seed=5)
    b = r.add(b_ids, share_prefix_of=a, shared_blocks=3)
    shared = r.blocks[a][:3]
    before = [c[shared].clone() for c in r.kv_caches]
    (got,) = r.step([(b, 6)])
    close(got, hf_logits(hf, b_ids)[12:])
    assert r.blocks[b][:3] == shared
    for c, old in zip(r.kv_caches, before):  # the shared blocks were read, not rewritten
        assert torch.equal(c[shared], old)


def test_cache_holds_latent_and_rope_key_only(hf, ours, loaded):
    cfg = loaded.config
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    r = PagedRunner(ours, cfg, block_size=4, num_blocks=16)
    for c in r.kv_caches:
        assert c.shape == (16, 4, width)
    ids = toks(10, seed=6)
    s = r.add(ids)
    r.step([(s, len(ids))])
    # transformers caches the same two tensors per layer: the normalised latent and the RoPE'd shared key.
    with torch.no_grad():
        past = hf(torch.tensor([ids]), use_cache=True).past_key_values
    slots = torch.tensor([r.blocks[s][p // 4] * 4 + p % 4 for p in range(len(ids))])
    for layer in range(cfg.num_hidden_layers):
        flat = r.kv_caches[layer].view(-1, width)
        want = torch.cat([past.layers[layer].keys[0, 0], past.layers[layer].values[0, 0]], dim=-1)
        torch.testing.assert_close(flat[slots], want, atol=1e-5, rtol=0)
        untouched = torch.ones(flat.shape[0], dtype=torch.bool)
        untouched[slots] = False
        assert not flat[untouched].any()  # nothing written outside the sequence's slots
    assert not r.kv_caches[cfg.num_hidden_layers].any()  # the MTP layer's cache is not touched by forward()


def test_absorbed_equals_expanded_attention(ours, loaded):
    """The backend attends over the latent with kv_b_proj absorbed; expanding K/V per head must agree."""
    cfg, attn = loaded.config, ours.model.layers[1].self_attn
    n_tok, h, n, v = 11, cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    r = PagedRunner(ours, cfg, block_size=4, num_blocks=8)
    ctx = build_context([SeqChunk([5, 2, 7], 0, n_tok)], 4, r.kv_caches, torch.device("cpu"))
    x = torch.randn(n_tok, cfg.hidden_size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        cos, sin = ours.model.rope(ctx.positions, x.dtype, ctx)
        q_nope, q_rope, latent, k_rope = attn.project(x, cos, sin)
        absorbed = ours.backend.mla(1, q_nope, q_rope, latent, k_rope, attn.mla_weights, ctx, attn.scale)
        kv = F.linear(latent, attn.kv_b_proj.weight).view(n_tok, h, n + v)
        k = torch.cat([kv[..., :n], k_rope[:, None, :].expand(-1, h, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        expanded = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), kv[..., n:].transpose(0, 1), is_causal=True, scale=attn.scale
        ).transpose(0, 1)
    assert absorbed.shape == (n_tok, h, v)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)
    # The absorbed weights are views of kv_b_proj, built once and reused across steps.
    assert attn.mla_weights is attn.mla_weights
    assert attn.mla_weights.w_uk.data_ptr() == attn.kv_b_proj.weight.data_ptr()


def test_mtp_layer_loaded(ckpt, ours, loaded):
    from safetensors import safe_open

    n = loaded.config.num_hidden_layers
    assert ours.mtp is not None and ours.mtp.layer.self_attn.layer_idx == n
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        torch.testing.assert_close(ours.mtp.eh_proj.weight, f.get_tensor(f"model.layers.{n}.eh_proj.weight"))
        kv_b = f.get_tensor(f"model.layers.{n}.self_attn.kv_b_proj.weight")
        up3 = f.get_tensor(f"model.layers.{n}.mlp.experts.3.up_proj.weight")
    torch.testing.assert_close(ours.mtp.layer.self_attn.kv_b_proj.weight, kv_b)
    torch.testing.assert_close(ours.mtp.layer.mlp.w13[3, up3.shape[0]:], up3)
    # A draft step runs through the MLA cache of layer n and no other.
    r = PagedRunner(ours, loaded.config, block_size=4, num_blocks=8)
    ctx = build_context([SeqChunk([3, 1], 0, 6)], 4, r.kv_caches, torch.device("cpu"))
    with torch.no_grad():
        hidden = ours.mtp(torch.tensor(toks(6, seed=12)), ctx.positions, torch.randn(6, loaded.config.hidden_size), ctx)
        logits = ours.mtp.compute_logits(hidden)
    assert logits.shape == (6, VOCAB) and torch.isfinite(logits).all()
    assert r.kv_caches[n].any() and not any(c.any() for c in r.kv_caches[:n])


def test_stacked_experts_q_proj_and_neox_rope(tmp_path):
    """q_proj instead of q_a/q_b (q_lora_rank None), rope_interleave off, 2 shared experts, and the weights
    given in transformers' in-memory layout (experts stacked [E, 2I, H])."""
    d = make_checkpoint("glm4_moe_lite", tmp_path, seed=5, vocab_size=VOCAB, overrides=dict(
        q_lora_rank=None, rope_interleave=False, n_shared_experts=2, num_nextn_predict_layers=0))
    hf = load_hf_model(d)
    cfg = ModelConfig.from_dir(d)
    model = Glm4MoeLiteForCausalLM(cfg, TorchAttentionBackend()).eval()
    for p in model.parameters():  # poison: a weight the loader misses cannot go unnoticed
        p.data.fill_(float("nan"))
    state = hf.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    loaded = model.load_weights(state.items())
    assert loaded == {name for name, _ in model.named_parameters()} and model.mtp is None
    ids = toks(12, seed=11)
    close(run_chunks(model, cfg, ids, [5, 1, 6]), hf_logits(hf, ids))


def test_bad_weights_are_clear_errors(loaded):
    model = Glm4MoeLiteForCausalLM(loaded.config, TorchAttentionBackend())
    good = dict(loaded.model.state_dict())
    with pytest.raises(WeightLoadError, match="model.layers.0.self_attn.bogus.weight"):
        model.load_weights([("model.layers.0.self_attn.bogus.weight", torch.zeros(1))])
    with pytest.raises(WeightLoadError, match="shape"):
        model.load_weights([("model.norm.weight", torch.zeros(3))])
    missing = [(k, v) for k, v in good.items() if not k.startswith("mtp.") and "kv_b_proj" not in k]
    with pytest.raises(WeightLoadError, match="kv_b_proj"):
        model.load_weights(missing)
