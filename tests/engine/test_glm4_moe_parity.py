"""glm4_moe against transformers' Glm4MoeForCausalLM on tiny random checkpoints, fp32 on CPU.

Every step runs through the paged KV cache with shuffled block ids; logits must match the full-sequence
reference within 1e-4 whatever the schedule (prefill, chunks, decode, mixed batches, prefix-cache hits).
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.hf_reference import (
    PagedRunner, hf_hidden, hf_logits, hf_mtp_reference, load_hf_model, load_ours, make_checkpoint,
    max_abs_diff, random_tokens, run_chunks, run_mtp, run_steps,
)

TOL = 1e-4
VOCAB = 320


@pytest.fixture(scope="module", params=[True, False], ids=["qknorm", "no_qknorm"])
def pair(request, tmp_path_factory):
    """(transformers model, our LoadedModel) for one tiny checkpoint."""
    d = make_checkpoint("glm4_moe", tmp_path_factory.mktemp("glm4_moe"), vocab_size=VOCAB, seed=3,
                        overrides={"use_qk_norm": request.param})
    return load_hf_model(d), load_ours(d, with_mtp=True)  # the MTP parity test needs the draft layer


def test_tiny_config_is_non_default(pair):
    cfg = pair[1].config
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    assert not cfg.norm_topk_prob and cfg.routed_scaling_factor != 1.0
    assert cfg.attention_bias and cfg.dense_layers[0] and not all(cfg.dense_layers)
    assert cfg.num_attention_heads == 6 and cfg.num_key_value_heads == 2
    assert cfg.rotary_dim < cfg.head_dim
    bias = pair[1].model.model.layers[1].mlp.e_score_correction_bias
    assert bias.abs().min() > 0 and bias.dtype == torch.float32


def test_full_prefill(pair):
    hf, ours = pair
    ids = random_tokens(23, VOCAB, seed=1)
    ref = hf_logits(hf, ids)
    got = run_chunks(ours.model, ours.config, ids, [len(ids)])
    assert ref.std() > 0.1  # a meaningful comparison
    assert max_abs_diff(got, ref) < TOL


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill(pair, chunk):
    hf, ours = pair
    ids = random_tokens(19, VOCAB, seed=2)
    got = run_chunks(ours.model, ours.config, ids, [chunk], block_size=5, seed=chunk)
    assert max_abs_diff(got, hf_logits(hf, ids)) < TOL


def test_decode_after_prefill(pair):
    hf, ours = pair
    ids = random_tokens(21, VOCAB, seed=4)
    got = run_chunks(ours.model, ours.config, ids, [13, 1], block_size=4, seed=11)
    assert max_abs_diff(got, hf_logits(hf, ids)) < TOL


def test_batch_of_different_lengths_in_one_step(pair):
    hf, ours = pair
    seqs = [random_tokens(n, VOCAB, seed=10 + n) for n in (5, 11, 17)]
    # Step 1: three prefills of different lengths together. Step 2: two decodes beside a prefill chunk.
    longer = [s + random_tokens(2, VOCAB, seed=99) for s in seqs[:2]] + [seqs[2] + random_tokens(6, VOCAB, seed=7)]
    steps = [[(0, 5), (1, 11), (2, 17)], [(0, 1), (2, 6), (1, 1)], [(1, 1), (0, 1)]]
    got = run_steps(ours.model, ours.config, longer, steps, block_size=3, seed=5)
    for s, g in zip(longer, got):
        assert max_abs_diff(g, hf_logits(hf, s)) < TOL


def test_prefix_cache_hit(pair):
    hf, ours = pair
    prefix = random_tokens(12, VOCAB, seed=21)
    a = prefix + random_tokens(5, VOCAB, seed=22)
    b = prefix + random_tokens(7, VOCAB, seed=23)
    runner = PagedRunner(ours.model, ours.config, block_size=4, seed=9)
    sa = runner.add(a)
    runner.step([(sa, len(a))])
    sb = runner.add(b, share_prefix_of=sa, shared_blocks=3)  # 12 cached tokens reused
    assert runner.blocks[sb][:3] == runner.blocks[sa][:3]
    runner.step([(sb, 4)])
    runner.step([(sb, 1)])
    runner.step([(sb, 2)])
    got = runner.sequence_logits(sb, start=12)
    assert max_abs_diff(got, hf_logits(hf, b)[12:]) < TOL


def test_mtp_layer_matches_transformers(pair):
    hf, ours = pair
    assert ours.model.mtp is not None
    ids = random_tokens(14, VOCAB, seed=31)
    h = hf_hidden(hf, ids)
    ref_h, ref_logits = hf_mtp_reference(hf, ids[1:], h[:-1])
    got_h, got_logits = run_mtp(ours.model, ours.config, ids[1:], h[:-1], chunk_sizes=[6, 1], block_size=4)
    assert max_abs_diff(got_h, ref_h) < TOL
    assert max_abs_diff(got_logits, ref_logits) < TOL


def test_compute_logits_is_float32(pair):
    ours = pair[1]
    hidden = torch.randn(3, ours.config.hidden_size)
    assert ours.model.compute_logits(hidden).dtype == torch.float32
