"""Attention backends against the torch reference through build_context, and backend selection.

On CPU the Triton backend runs under Triton's interpreter (fp32/fp16: bf16 is wrong there); the
FlashInfer and FA3 backends need CUDA and run in the `gpu` tests, which skip cleanly without one.
"""

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    # Must precede the first import of glmserve.kernels (the backends import them lazily).
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from glmserve.engine.attention import capability, registry  # noqa: E402
from glmserve.engine.attention.backend import KVCacheSpec, MLAWeights  # noqa: E402
from glmserve.engine.attention.context import SeqChunk, build_context  # noqa: E402
from glmserve.engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


def needs_gpu_backend(name):
    """Skip unless CUDA is present and backend `name` can run on it."""
    if not HAS_CUDA:
        return pytest.mark.skip(reason="needs a CUDA device")
    reason = registry.unavailable_reason(name, torch.device("cuda"))
    return pytest.mark.skipif(reason is not None, reason=reason or "")


# Three steps of two sequences sharing one cache: prefill chunks, then a chunk over a cached prefix
# mixed with a decode row (and a third sequence hitting a cached prefix), then decode only.
STEPS = [
    [("a", 0, 7), ("b", 0, 5)],
    [("a", 7, 6), ("b", 5, 1), ("c", 9, 4)],
    [("a", 13, 1), ("b", 6, 1), ("c", 13, 1)],
]
BLOCKS = {"a": [3, 9, 1, 12], "b": [5, 0], "c": [7, 2, 11, 4]}


def compare_steps(backend, kind, dims, dtype, device, tol, seed=0):
    """Run STEPS through `backend` and, step by step from the same cache contents, through the torch
    reference: outputs must match, and the new KV must land in its slots.

    The reference gets a fresh copy of the caches each step, so the comparison checks each step's
    attention on its own, whatever the reference does with its copy afterwards.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    bs, num_blocks, layers = dims["block_size"], 16, 2
    if kind == "gqa":
        spec = KVCacheSpec("gqa", bs, num_kv_heads=dims["hkv"], head_dim=dims["d"])
    else:
        spec = KVCacheSpec("mla", bs, latent_dim=dims["rank"] + dims["rope"])
        h, rank = dims["heads"], dims["rank"]
        weights = MLAWeights(w_uk=rand(h, dims["nope"], rank) / rank**0.5, w_uv=rand(h, dims["v"], rank) / rank**0.5)
    # Random initial contents stand in for the KV of prefixes cached by earlier requests.
    caches = [rand(*spec.layer_shape(num_blocks)) for _ in range(layers)]
    reference = TorchAttentionBackend()
    for step in STEPS:
        chunks = [SeqChunk(BLOCKS[name], cached, new) for name, cached, new in step]
        ref_caches = [c.clone() for c in caches]
        expected = [c.clone() for c in caches]
        ctx = build_context(chunks, bs, caches, torch.device(device))
        ref_ctx = build_context(chunks, bs, ref_caches, torch.device(device))
        backend.prepare(ctx)
        reference.prepare(ref_ctx)
        blocks, offsets = ctx.slot_mapping // bs, ctx.slot_mapping % bs
        t = sum(new for _, _, new in step)
        for layer in range(layers):
            if kind == "gqa":
                q, k, v = rand(t, dims["hq"], dims["d"]), rand(t, dims["hkv"], dims["d"]), rand(t, dims["hkv"], dims["d"])
                out = backend.gqa(layer, q, k, v, ctx, dims["d"] ** -0.5)
                ref = reference.gqa(layer, q, k, v, ref_ctx, dims["d"] ** -0.5)
                expected[layer][blocks, 0, offsets] = k
                expected[layer][blocks, 1, offsets] = v
            else:
                q_nope, q_rope = rand(t, h, dims["nope"]), rand(t, h, dims["rope"])
                latent, k_rope = rand(t, rank), rand(t, dims["rope"])
                scale = (dims["nope"] + dims["rope"]) ** -0.5
                out = backend.mla(layer, q_nope, q_rope, latent, k_rope, weights, ctx, scale)
                ref = reference.mla(layer, q_nope, q_rope, latent, k_rope, weights, ref_ctx, scale)
                expected[layer][blocks, offsets] = torch.cat([latent, k_rope], dim=-1)
            torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
            torch.testing.assert_close(caches[layer], expected[layer], atol=0, rtol=0)


CPU_GQA = dict(block_size=4, hq=6, hkv=2, d=16)
CPU_MLA = dict(block_size=4, heads=3, nope=8, rope=8, v=12, rank=32)


@pytest.mark.parametrize("dtype,tol,num_splits", [
    (torch.float32, 1e-4, None),
    (torch.float16, 3e-3, None),
    (torch.float32, 1e-4, 2),  # split-KV (flash-decoding) forced on every step
], ids=["fp32", "fp16", "fp32-split2"])
@pytest.mark.parametrize("kind,dims", [("gqa", CPU_GQA), ("mla", CPU_MLA)], ids=["gqa", "mla"])
def test_triton_backend_matches_torch_on_mixed_steps(kind, dims, dtype, tol, num_splits):
    from glmserve.engine.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend(num_splits=num_splits)
    compare_steps(backend, kind, dims, dtype, "cuda" if HAS_CUDA else "cpu", tol)


# -- selection ----------------------------------------------------------------------------------


def test_registry_names_and_cpu_choice():
    assert {"torch", "triton", "flashinfer", "fa3"} <= set(registry.available())
    assert registry.resolve("auto", torch.device("cpu")) == "torch"
    assert isinstance(registry.create("auto", torch.device("cpu")), TorchAttentionBackend)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        registry.create("nope", torch.device("cpu"))


@pytest.mark.parametrize("name", ["triton", "flashinfer", "fa3"])
def test_gpu_backends_refuse_cpu_with_a_clear_error(name):
    with pytest.raises(ValueError, match=f"attention backend '{name}' cannot run on device 'cpu'.*CUDA device"):
        registry.create(name, torch.device("cpu"))


def fake_gpu(monkeypatch, cap, flashinfer, fa3):
    monkeypatch.setattr(capability, "cuda_capability", lambda device: cap)
    monkeypatch.setattr(capability, "flashinfer_installed", lambda: flashinfer)
    monkeypatch.setattr(capability, "fa3_installed", lambda: fa3)
    monkeypatch.setattr(capability, "triton_installed", lambda: True)


@pytest.mark.parametrize("cap,flashinfer,fa3,expected", [
    ((9, 0), True, False, "fa3"),  # Hopper: FlashInfer's FA3 kernels
    ((9, 0), False, True, "fa3"),  # Hopper: the FA3 library
    ((8, 0), True, True, "flashinfer"),  # Ampere: no FA3
    ((9, 0), False, False, "triton"),  # nothing installed: our kernels
    ((8, 9), False, False, "triton"),
])
def test_auto_on_cuda_prefers_fa3_then_flashinfer_then_triton(monkeypatch, cap, flashinfer, fa3, expected):
    fake_gpu(monkeypatch, cap, flashinfer, fa3)
    assert registry.resolve("auto", torch.device("cuda")) == expected


def test_unavailable_reasons_name_the_missing_requirement(monkeypatch):
    cuda = torch.device("cuda")
    fake_gpu(monkeypatch, (8, 0), flashinfer=False, fa3=True)
    assert "Hopper" in registry.unavailable_reason("fa3", cuda)
    assert "flashinfer-python" in registry.unavailable_reason("flashinfer", cuda)
    with pytest.raises(ValueError, match="needs a Hopper GPU"):
        registry.create("fa3", cuda)
    fake_gpu(monkeypatch, (9, 0), flashinfer=False, fa3=False)
    assert "neither is installed" in registry.unavailable_reason("fa3", cuda)
    fake_gpu(monkeypatch, (7, 5), flashinfer=True, fa3=False)
    assert "compute capability >= 8.0" in registry.unavailable_reason("flashinfer", cuda)
    monkeypatch.setattr(capability, "cuda_capability", lambda device: None)
    assert "no CUDA available" in registry.unavailable_reason("triton", cuda)


@pytest.mark.skipif(capability.flashinfer_installed(), reason="flashinfer is installed here")
def test_flashinfer_backend_without_the_library_says_so():
    from glmserve.engine.attention.flashinfer_backend import FlashInferAttentionBackend

    with pytest.raises(capability.BackendUnavailable, match="flashinfer-python"):
        FlashInferAttentionBackend()


@pytest.mark.skipif(capability.fa3_installed(), reason="FA3 is installed here")
def test_fa3_backend_without_the_library_says_so():
    from glmserve.engine.attention.fa3_backend import FA3AttentionBackend

    with pytest.raises(capability.BackendUnavailable, match="flash_attn_interface"):
        FA3AttentionBackend()


def test_importing_the_engine_loads_no_kernels_or_gpu_libraries():
    code = ("import sys, glmserve.engine, glmserve.engine.attention.registry as r; "
            "r.create('auto', 'cpu'); "
            "bad = [m for m in sys.modules if m.startswith(('glmserve.kernels', 'flashinfer', 'flash_attn', 'triton'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": ""})


# -- GPU: every GPU backend against the torch reference at GLM-like shapes, bf16 -----------------

GPU_GQA = dict(block_size=16, hq=12, hkv=2, d=128)
GPU_MLA = dict(block_size=16, heads=16, nope=192, rope=64, v=256, rank=512)


@gpu
@pytest.mark.parametrize("name", [
    pytest.param("triton", marks=needs_gpu_backend("triton")),
    pytest.param("flashinfer", marks=needs_gpu_backend("flashinfer")),
    pytest.param("fa3", marks=needs_gpu_backend("fa3")),
])
@pytest.mark.parametrize("kind,dims", [("gqa", GPU_GQA), ("mla", GPU_MLA)], ids=["gqa", "mla"])
def test_gpu_backend_matches_torch(name, kind, dims):
    compare_steps(registry.create(name, torch.device("cuda")), kind, dims, torch.bfloat16, "cuda", tol=3e-2)


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_auto_on_this_gpu_builds_a_gpu_backend():
    backend = registry.create("auto", torch.device("cuda"))
    assert backend.name in {"fa3", "flashinfer", "triton"}


def test_roles_share_one_backend_on_cpu_and_split_when_asked():
    from glmserve.engine.attention.registry import create_for_roles
    from glmserve.engine.attention.torch_backend import TorchAttentionBackend

    assert isinstance(create_for_roles("auto", "auto", torch.device("cpu")), TorchAttentionBackend)
    with pytest.raises(ValueError, match="prefill backend"):
        create_for_roles("auto", "fa3", torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot run"):
        create_for_roles("auto", "flashinfer", torch.device("cpu"))


def test_split_backend_routes_decode_only_steps_to_the_decode_backend():
    from glmserve.engine.attention.split_backend import SplitAttentionBackend
    from glmserve.engine.attention.torch_backend import TorchAttentionBackend

    calls = []

    class Recording(TorchAttentionBackend):
        def __init__(self, tag):
            self.name = tag

        def gqa(self, layer, q, k, v, ctx, scale):
            calls.append(self.name)
            return q

    split = SplitAttentionBackend(Recording("prefill"), Recording("decode"))

    class Ctx:
        def __init__(self, lens):
            self.query_lens_cpu = lens

        @property
        def is_decode_only(self):
            return all(q == 1 for q in self.query_lens_cpu)

    q = torch.zeros(2, 1, 1)
    split.gqa(0, q, q, q, Ctx([1, 1]), 1.0)
    split.gqa(0, q, q, q, Ctx([1, 5]), 1.0)
    assert calls == ["decode", "prefill"] and split.name == "prefill+decode"
