"""Kernel selection (engine/kernel_selection.py): Triton kernels in the model hooks on CUDA, the torch
references elsewhere. The device is faked (selection only looks at it); the selected kernels then run
on CPU under Triton's interpreter and must give the reference model's logits."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports glmserve.kernels

import pytest  # noqa: E402

from glmserve.engine.config import CacheConfig  # noqa: E402
from glmserve.engine.kernel_selection import KernelChoice, apply_kernels, choose_kernels  # noqa: E402
from glmserve.engine.model_runner import ModelRunner  # noqa: E402
from glmserve.engine.models.layers import RMSNorm  # noqa: E402
from glmserve.engine.models.moe import MoE, experts_reference  # noqa: E402
from tests.engine.hf_reference import load_ours, make_checkpoint, random_tokens, run_chunks  # noqa: E402

VOCAB = 200
IDS = random_tokens(9, VOCAB, seed=3)


def test_triton_on_cuda_torch_elsewhere():
    triton = KernelChoice(moe="triton", rmsnorm="triton")
    assert choose_kernels(torch.device("cuda"), triton_available=True) == triton
    assert choose_kernels(torch.device("cuda:1"), triton_available=True) == triton
    assert choose_kernels(torch.device("cuda"), triton_available=False) == KernelChoice()
    assert choose_kernels(torch.device("cpu"), triton_available=True) == KernelChoice()
    assert choose_kernels(torch.device("cuda")) == triton  # triton is installed here


@pytest.fixture(scope="module", params=["glm4_moe", "glm4_moe_lite"])
def tiny(request, tmp_path_factory):
    d = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), vocab_size=VOCAB, seed=7)
    return load_ours(d)


def test_selected_kernels_fill_every_hook_and_match_the_reference(tiny):
    from glmserve.kernels.fused_moe import fused_moe

    model = tiny.model
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    ref = run_chunks(model, tiny.config, IDS, [5, 1])
    counts = apply_kernels(model, choose_kernels(torch.device("cuda"), triton_available=True))
    try:
        assert counts == {"moe": len(moes), "rmsnorm": len(norms)} and moes and norms
        assert all(m.experts_fn is fused_moe for m in moes) and all(m.norm_fn is not None for m in norms)
        out = run_chunks(model, tiny.config, IDS, [5, 1])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    finally:
        apply_kernels(model, KernelChoice())
    assert all(m.experts_fn is experts_reference for m in moes) and all(m.norm_fn is None for m in norms)


def test_hooks_set_by_others_are_left_alone(tiny):
    moe = next(m for m in tiny.model.modules() if isinstance(m, MoE))
    own = lambda *args: None  # noqa: E731 - e.g. FP8 experts
    moe.experts_fn = own
    try:
        counts = apply_kernels(tiny.model, KernelChoice(moe="triton"))
        assert moe.experts_fn is own and counts["moe"] == sum(isinstance(m, MoE) for m in tiny.model.modules()) - 1
    finally:
        moe.experts_fn = experts_reference
        apply_kernels(tiny.model, KernelChoice())


def test_model_runner_keeps_the_references_on_cpu(tiny):
    from glmserve.engine.attention.torch_backend import TorchAttentionBackend

    runner = ModelRunner(tiny.model, tiny.config, TorchAttentionBackend(), CacheConfig(block_size=4, num_blocks=8),
                         torch.float32, torch.device("cpu"))
    assert runner.kernels == KernelChoice()
    assert all(m.experts_fn is experts_reference for m in tiny.model.modules() if isinstance(m, MoE))
