"""FP8 checkpoints kept in FP8 (engine/fp8.py): when the loader chooses it (capability faked on CPU), how
weights and scales land, and the FP8 model path against the dequantized one. On CPU the FP8 modules run
the dequantized reference GEMMs, so everything but the GPU kernels is checked here; the `gpu` test loads
on a real FP8 GPU."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports glmserve.kernels

import pytest  # noqa: E402

from glmserve.engine import fp8, loader  # noqa: E402
from glmserve.engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from glmserve.engine.models.moe import MoE  # noqa: E402
from glmserve.engine.models.layers import Linear  # noqa: E402
from glmserve.engine.models.weight_utils import WeightLoadError  # noqa: E402
from glmserve.engine.weights import checkpoint_files  # noqa: E402
from tests.engine.hf_reference import load_ours, make_checkpoint, random_tokens, run_chunks  # noqa: E402

VOCAB = 200
IDS = random_tokens(11, VOCAB, seed=1)
CUDA = torch.device("cuda")


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _files(model_dir) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.fixture(scope="module", params=["glm4_moe", "glm4_moe_lite"])
def fp8_dir(request, tmp_path_factory):
    return make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), vocab_size=VOCAB, seed=4,
                           fp8=True, shards=2)


def fake_capability(monkeypatch, cap):
    monkeypatch.setattr(fp8, "cuda_capability", lambda device: cap if torch.device(device).type == "cuda" else None)


@pytest.mark.parametrize("cap,expected", [((9, 0), True), ((8, 9), True), ((8, 0), False), (None, False)])
def test_fp8_gemm_support_follows_compute_capability(monkeypatch, cap, expected):
    fake_capability(monkeypatch, cap)
    assert fp8.fp8_gemm_supported(CUDA) is expected
    assert fp8.fp8_gemm_supported(torch.device("cpu")) is False


def test_loader_keeps_fp8_only_on_capable_devices(monkeypatch, fp8_dir, tmp_path):
    cfg = loader.read_model_config(fp8_dir)
    plain = make_checkpoint("glm4_moe", tmp_path / "bf16", vocab_size=VOCAB, seed=4)
    fake_capability(monkeypatch, (9, 0))
    layout = fp8.plan_fp8(cfg, CUDA, fp8_dir)
    assert layout is not None and layout.weights and not layout.blockwise
    assert all(n + "_scale" in layout.scales for n in layout.weights)
    assert fp8.plan_fp8(loader.read_model_config(plain), CUDA, plain) is None  # not an FP8 checkpoint
    assert fp8.plan_fp8(cfg, torch.device("cpu"), fp8_dir) is None
    fake_capability(monkeypatch, (8, 6))  # Ampere: no FP8 tensor cores
    assert fp8.plan_fp8(cfg, CUDA, fp8_dir) is None
    assert "capability" in fp8.keep_fp8_reason(cfg, CUDA, layout)
    fake_capability(monkeypatch, (9, 0))
    blockwise = fp8.Fp8Layout(layout.weights, {n: (4, 4) for n in layout.scales})
    assert "block-wise" in fp8.keep_fp8_reason(cfg, CUDA, blockwise)


@pytest.fixture(scope="module")
def loaded_pair(fp8_dir):
    """(dequantized load, FP8 load) of the same checkpoint on CPU; the FP8 one through the loader's
    keep-FP8 branch, as it runs on a capable GPU."""
    plain = load_ours(fp8_dir)
    mp = pytest.MonkeyPatch()
    mp.setattr(loader, "plan_fp8", lambda cfg, dev, d: fp8.checkpoint_fp8_layout(d))
    try:
        kept = load_ours(fp8_dir)
    finally:
        mp.undo()
    return plain, kept


def test_fp8_load_keeps_weights_and_scales_as_stored(fp8_dir, loaded_pair):
    plain, kept = loaded_pair
    files = _files(fp8_dir)
    layers = kept.model.model.layers
    mla = kept.config.is_mla
    lin = layers[1].self_attn.q_a_proj if mla else layers[1].self_attn.q_proj
    name = "model.layers.1.self_attn." + ("q_a_proj" if mla else "q_proj")
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.fp8_gemm is fp8.fp8_linear
    assert torch.equal(lin.weight.view(torch.uint8), files[name + ".weight"].view(torch.uint8))
    assert torch.equal(lin.weight_scale, files[name + ".weight_scale"].reshape(-1))
    # dense MLP: gate and up halves of one fused weight, each with its own scales
    gu = layers[0].mlp.gate_up_proj
    inter = gu.out_features // 2
    assert torch.equal(gu.weight_scale[:inter], files["model.layers.0.mlp.gate_proj.weight_scale"].reshape(-1))
    assert torch.equal(gu.weight_scale[inter:], files["model.layers.0.mlp.up_proj.weight_scale"].reshape(-1))
    # experts: per-expert, per-half scales in [E, 2I] / [E, H] buffers, FP8 experts installed
    moe = next(m for m in kept.model.modules() if isinstance(m, MoE))
    idx = next(i for i, layer in enumerate(layers) if layer.mlp is moe)
    assert moe.w13.dtype == torch.float8_e4m3fn and isinstance(moe.experts_fn, fp8.Fp8Experts)
    up = files[f"model.layers.{idx}.mlp.experts.3.up_proj.weight_scale"].reshape(-1)
    assert torch.equal(moe.w13_scale[3, moe.w13.shape[1] // 2:], up)
    assert torch.equal(moe.w2_scale[1], files[f"model.layers.{idx}.mlp.experts.1.down_proj.weight_scale"].reshape(-1))
    # lm_head (ignored by the checkpoint) and, for MLA, kv_b_proj (read as per-head matrices) are not FP8
    assert kept.model.lm_head.weight.dtype == torch.float32
    if mla:
        kv_b = layers[1].self_attn.kv_b_proj
        assert kv_b.weight.dtype == torch.float32 and kv_b.fp8_gemm is None
        torch.testing.assert_close(kv_b.weight, plain.model.model.layers[1].self_attn.kv_b_proj.weight)


def fp8_layer_errors(loaded, run=None, **runner_kw) -> tuple[torch.Tensor, dict[str, float]]:
    """Logits of a forward pass (`run(loaded)`, else a text prompt), and each FP8 GEMM's relative error against
    the same GEMM on dequantized weights and unrounded inputs (Linear layers by name, experts under their
    MoE's name)."""
    from glmserve.kernels.fused_moe import fused_moe_ref

    errors: dict[str, float] = {}

    def linear_hook(name):
        def hook(mod, inputs, out):
            w = mod.weight.float() * mod.weight_scale[:, None]
            bias = mod.bias.float() if mod.bias is not None else None
            errors[name] = _rel(out, torch.nn.functional.linear(inputs[0].float(), w, bias))
        return hook

    def experts_hook(name, moe, fn):
        def wrapped(x, tw, ti, w13, w2):
            out = fn(x, tw, ti, w13, w2)
            ref = fused_moe_ref(x.float(), tw, ti, w13.float() * moe.w13_scale[..., None],
                                w2.float() * moe.w2_scale[..., None])
            errors[name] = _rel(out, ref)
            return out
        return wrapped

    model, handles = loaded.model, []
    for name, m in model.named_modules():
        if isinstance(m, Linear) and m.fp8_gemm is not None:
            handles.append(m.register_forward_hook(linear_hook(name)))
        elif isinstance(m, MoE):
            m.experts_fn = experts_hook(name, m, m.experts_fn)
    try:
        out = run(loaded) if run else run_chunks(model, loaded.config, IDS, [7, 1], **runner_kw)
    finally:
        for h in handles:
            h.remove()
        fp8.finish_fp8(model, loaded.dtype)  # puts the plain FP8 experts back
    return out, errors


def check_layer_errors(loaded, out, errors, linear_tol=0.05, experts_tol=0.09):
    assert torch.isfinite(out).all()
    linear = [e for n, e in errors.items() if not n.endswith("mlp")]
    experts = [e for n, e in errors.items() if n.endswith("mlp")]
    assert len(linear) >= 4 * loaded.config.num_hidden_layers and experts
    # Per-token activation rounding only (~2.5% per GEMM); wrong or missing scales would be far off.
    # (Whole-model logits of a random tiny model are no yardstick: a ~3% change flips expert choices.)
    assert all(1e-4 < e < linear_tol for e in linear), errors
    assert all(1e-4 < e < experts_tol for e in experts), errors


def test_fp8_layers_match_their_dequantized_versions(loaded_pair):
    _, kept = loaded_pair
    out, errors = fp8_layer_errors(kept)
    check_layer_errors(kept, out, errors)


def test_quantizing_a_loaded_model_gives_the_fp8_checkpoint_model(fp8_dir, loaded_pair):
    """quantize_model_fp8 (dummy-weight benchmarks) re-creates exactly what the FP8 loader loads."""
    plain, kept = loaded_pair
    q = load_ours(fp8_dir)
    n = fp8.quantize_model_fp8(q.model)
    assert n > 0 and q.model.lm_head.fp8_gemm is None
    assert any(isinstance(m, MoE) and isinstance(m.experts_fn, fp8.Fp8Experts) for m in q.model.modules())
    ref = run_chunks(kept.model, kept.config, IDS, [len(IDS)])
    out = run_chunks(q.model, q.config, IDS, [len(IDS)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, run_chunks(plain.model, plain.config, IDS, [len(IDS)]), atol=1e-3)


def test_missing_scales_are_reported(fp8_dir):
    cfg = loader.read_model_config(fp8_dir)
    layout = fp8.checkpoint_fp8_layout(fp8_dir)
    model = loader.build_model(cfg, TorchAttentionBackend(), torch.float32, torch.device("cpu"), fp8_layout=layout)
    for m in model.modules():
        if isinstance(m, Linear) and m.weight_scale is not None:
            m.weight_scale.fill_(float("nan"))
    scales = {n + "_scale": torch.ones(s[0], 1) for n, s in layout.weights.items() if not n.endswith("down_proj.weight")}
    with pytest.raises(WeightLoadError, match="lacks FP8 scales"):
        fp8.assign_scales(model, scales, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fp8_checkpoint_stays_fp8_and_its_gemms_match_dequantized(fp8_dir):
    if not fp8.fp8_gemm_supported(CUDA):
        pytest.skip("needs FP8 tensor cores (sm89+)")
    from glmserve.engine.attention.triton_backend import TritonAttentionBackend

    kw = dict(device="cuda", dtype="bfloat16", backend=TritonAttentionBackend())
    kept = load_ours(fp8_dir, **kw)
    lin = next(m for m in kept.model.modules() if isinstance(m, Linear) and m.fp8_gemm is not None)
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight.is_cuda
    from glmserve.engine.kernel_selection import select_kernels

    select_kernels(kept.model, CUDA)  # experts stay FP8; norms go to Triton, as in the model runner
    out, errors = fp8_layer_errors(kept, device="cuda", dtype=torch.bfloat16)
    # bf16 activations and outputs add their own rounding to the FP8 error
    check_layer_errors(kept, out, errors, linear_tol=0.06, experts_tol=0.1)
