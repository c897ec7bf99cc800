"""FP8 GLM-4.5V / 4.6V checkpoints (the GLM-4.5V-FP8 layout: the text model's linear layers and experts in
FP8 with per-channel scales; vision tower, lm_head and router gates as stored) load as the text models'
FP8 checkpoints do: dequantized on the CPU (then the same model as the dequantized checkpoint, which
transformers agrees with for prompts with images), kept FP8 on FP8 GPUs (the loader's keep-FP8 branch,
run here on CPU through the dequantized reference GEMMs)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports glmserve.kernels

import pytest  # noqa: E402

from glmserve.engine import fp8, loader  # noqa: E402
from glmserve.engine.models.layers import Linear  # noqa: E402
from glmserve.engine.models.moe import MoE  # noqa: E402
from glmserve.engine.tiny_model import build_tiny_model  # noqa: E402
from tests.engine.hf_reference import dequantized_copy, load_ours, max_abs_diff  # noqa: E402
from tests.engine.test_fp8 import _files, check_layer_errors, fp8_layer_errors  # noqa: E402
from tests.engine.vl_reference import (  # noqa: E402
    VLRunner, hf_vl_logits, load_hf_vl, processed, prompt_ids, random_image, text_ids,
)

TOL = 1e-4  # the VL parity tests' bound against transformers


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(FP8 checkpoint, its dequantized fp32 copy: same config without quantization_config)."""
    d = build_tiny_model("glm4v_moe", tmp_path_factory.mktemp("glm4v_fp8"), seed=6, fp8=True)
    plain = dequantized_copy(d, d.parent / "dequant")
    shutil.copy(d / "preprocessor_config.json", plain / "preprocessor_config.json")
    return d, plain


@pytest.fixture(scope="module")
def prompt(dirs):
    d, _ = dirs
    pil = [random_image(40, 56, seed=1), random_image(24, 96, seed=3)]
    ims = processed(pil, d)
    return pil, ims, prompt_ids([text_ids(4, 1), None, text_ids(3, 2), None, text_ids(5, 3)], ims)


def _logits(loaded, ims, ids) -> torch.Tensor:
    """Logits of every prompt row through our ModelRunner; the first chunk ends inside the first image."""
    run = VLRunner(loaded, block_size=4, seed=1)
    req = run.add("a", ids, ims)
    run.step([(req, 9)])
    run.step([(req, len(ids) - 9)])
    return run.sequence_logits("a")


def test_checkpoint_has_the_fp8_release_layout(dirs):
    d, _ = dirs
    cfg = loader.read_model_config(d)
    assert cfg.arch == "glm4v_moe" and cfg.quant is not None and cfg.quant.method == "fp8"
    files = _files(d)
    fp8_names = {k for k, t in files.items() if t.dtype == torch.float8_e4m3fn}
    assert all(k.startswith("model.language_model.layers.") for k in fp8_names)
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in fp8_names
    assert "model.language_model.layers.1.mlp.experts.5.down_proj.weight" in fp8_names
    assert all(k + "_scale" in files for k in fp8_names)
    kept = [k for k in files if k.startswith(("model.visual.", "lm_head")) or k.endswith("mlp.gate.weight")]
    assert kept and not any(files[k].dtype == torch.float8_e4m3fn for k in kept)


def test_cpu_load_dequantizes_to_the_dequantized_checkpoint_and_matches_transformers(dirs, prompt):
    d, plain = dirs
    pil, ims, ids = prompt
    ours = load_ours(d)
    assert not any(p.dtype == torch.float8_e4m3fn for p in ours.model.parameters())
    ref = _logits(load_ours(plain), ims, ids)
    got = _logits(ours, ims, ids)
    assert ref.std() > 0.1
    assert max_abs_diff(got, ref) < 1e-5  # the same fp32 weights: weight * scale either way
    hf = hf_vl_logits(load_hf_vl(plain), plain, ids, pil)  # transformers on the dequantized weights
    assert max_abs_diff(got, hf) < TOL


@pytest.fixture(scope="module")
def kept(dirs):
    """The FP8 checkpoint through the loader's keep-FP8 branch, as on a capable GPU."""
    d, _ = dirs
    mp = pytest.MonkeyPatch()
    mp.setattr(loader, "plan_fp8", lambda cfg, dev, model_dir: fp8.checkpoint_fp8_layout(model_dir))
    try:
        return load_ours(d)
    finally:
        mp.undo()


def test_keep_fp8_load_keeps_text_weights_fp8_and_the_tower_as_stored(dirs, kept):
    d, _ = dirs
    files = _files(d)
    layers = kept.model.model.layers
    q = layers[0].self_attn.q_proj
    name = "model.language_model.layers.0.self_attn.q_proj"
    assert q.weight.dtype == torch.float8_e4m3fn and q.fp8_gemm is fp8.fp8_linear
    assert torch.equal(q.weight.view(torch.uint8), files[name + ".weight"].view(torch.uint8))
    assert torch.equal(q.weight_scale, files[name + ".weight_scale"].reshape(-1))
    moe = layers[1].mlp
    assert isinstance(moe, MoE) and moe.w13.dtype == torch.float8_e4m3fn and isinstance(moe.experts_fn, fp8.Fp8Experts)
    up = files["model.language_model.layers.1.mlp.experts.3.up_proj.weight_scale"].reshape(-1)
    assert torch.equal(moe.w13_scale[3, moe.w13.shape[1] // 2:], up)
    assert moe.gate_weight.dtype == torch.float32 and kept.model.lm_head.weight.dtype == torch.float32
    tower = [m for m in kept.model.visual.modules() if isinstance(m, Linear)]
    assert tower and all(m.weight.dtype == torch.float32 and m.fp8_gemm is None for m in tower)


def test_keep_fp8_model_with_images_matches_the_dequantized_gemms(dirs, prompt, kept):
    _, plain = dirs
    pil, ims, ids = prompt
    # The tower is not quantized: its output is the dequantized model's, exactly.
    patches = torch.from_numpy(np.concatenate([im.patches for im in ims]))
    grids = [tuple(im.grid_thw) for im in ims]
    with torch.no_grad():
        torch.testing.assert_close(kept.model.encode_images(patches, grids),
                                   load_ours(plain).model.encode_images(patches, grids), rtol=0, atol=0)
    # Every FP8 GEMM of a prompt with two images within test_fp8's bounds of the same GEMM on dequantized
    # weights (whole-model logits of a random tiny MoE are no yardstick: rounding flips expert choices).
    out, errors = fp8_layer_errors(kept, run=lambda loaded: _logits(loaded, ims, ids))
    check_layer_errors(kept, out, errors)
    assert not any(n.startswith("visual.") for n in errors)  # no FP8 GEMM in the tower


def test_quantizing_a_loaded_vl_model_gives_the_fp8_checkpoint_model(dirs, prompt, kept):
    """quantize_model_fp8 (dummy-weight benchmarks) leaves the tower alone, as the FP8 releases do."""
    d, _ = dirs
    _, ims, ids = prompt
    q = load_ours(d)
    assert fp8.quantize_model_fp8(q.model) > 0
    assert all(m.fp8_gemm is None for m in q.model.visual.modules() if isinstance(m, Linear))
    torch.testing.assert_close(_logits(q, ims, ids), _logits(kept, ims, ids), rtol=1e-5, atol=1e-5)
