"""Checkpoint loading: sharded and FP8 safetensors, both expert layouts, MTP weights, dummy weights, errors.

Logit checks here run one full-prefill step, so they test the weights, not the cache schedule
(test_glm4_moe_parity covers that).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from glmserve.engine.attention.torch_backend import TorchAttentionBackend
from glmserve.engine.config import ModelConfig, QuantConfig
from glmserve.engine.dtypes import resolve_device, resolve_dtype
from glmserve.engine.loader import build_model, load_model, read_model_config
from glmserve.engine.models.weight_utils import WeightLoadError
from glmserve.engine.weights import checkpoint_files, iterate_weights
from tests.engine.hf_reference import (
    hf_logits, load_hf_model, load_ours, make_checkpoint, max_abs_diff, random_tokens, run_chunks,
)

TOL = 1e-4
VOCAB = 200
IDS = random_tokens(13, VOCAB, seed=0)


def _logits(loaded) -> torch.Tensor:
    return run_chunks(loaded.model, loaded.config, IDS, [len(IDS)])


def _file_tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def _fresh(cfg: ModelConfig, with_mtp: bool = False):
    return build_model(cfg, TorchAttentionBackend(), torch.float32, torch.device("cpu"), with_mtp=with_mtp)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return make_checkpoint("glm4_moe", tmp_path_factory.mktemp("single"), vocab_size=VOCAB, seed=5)


@pytest.fixture(scope="module")
def single_loaded(single):
    return load_ours(single, with_mtp=True)


def test_sharded_checkpoint_matches_reference_and_single_file(tmp_path, single, single_loaded):
    d = make_checkpoint("glm4_moe", tmp_path / "sharded", vocab_size=VOCAB, seed=5, shards=3,
                        config_layout="published")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and not (d / "model.safetensors").exists()
    ours = load_ours(d)
    assert max_abs_diff(_logits(ours), hf_logits(load_hf_model(d), IDS)) < TOL
    same = single_loaded.model.state_dict()
    for name, p in ours.model.state_dict().items():
        assert torch.equal(p, same[name]), name


def test_fp8_checkpoint_dequantizes_and_matches_reference(tmp_path):
    d = make_checkpoint("glm4_moe", tmp_path / "fp8", vocab_size=VOCAB, seed=6, fp8=True, shards=4)
    files = _file_tensors(d)
    w, s = files["model.layers.1.self_attn.q_proj.weight"], files["model.layers.1.self_attn.q_proj.weight_scale"]
    assert w.dtype == torch.float8_e4m3fn and s.shape == (w.shape[0], 1)
    assert files["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the router stays unquantized
    ours = load_ours(d, dtype="auto")
    assert ours.dtype == torch.float32 and ours.config.quant is not None  # auto on CPU: fp32
    q = ours.model.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(q, w.float() * s.float())
    expert = ours.model.model.layers[2].mlp.w13[4]
    gate = files["model.layers.2.mlp.experts.4.gate_proj.weight"].float()
    gate = gate * files["model.layers.2.mlp.experts.4.gate_proj.weight_scale"].float()
    assert torch.equal(expert[: gate.shape[0]], gate)
    assert max_abs_diff(_logits(ours), hf_logits(load_hf_model(d), IDS)) < TOL


def test_fused_3d_expert_layout_loads_the_same(single, single_loaded):
    """transformers' in-memory layout: mlp.experts.gate_up_proj [E, 2I, H] and mlp.experts.down_proj [E, H, I]."""
    cfg = single_loaded.config
    tensors = dict(iterate_weights(single, show_progress=False))
    fused = {}
    for layer in range(1, cfg.num_hidden_layers + 1):
        p = f"model.layers.{layer}.mlp.experts."
        e_range = range(cfg.n_routed_experts)
        fused[p + "gate_up_proj"] = torch.stack(
            [torch.cat([tensors.pop(f"{p}{e}.gate_proj.weight"), tensors.pop(f"{p}{e}.up_proj.weight")]) for e in e_range])
        fused[p + "down_proj"] = torch.stack([tensors.pop(f"{p}{e}.down_proj.weight") for e in e_range])
    model = _fresh(cfg, with_mtp=True)
    model.load_weights(list(tensors.items()) + list(fused.items()))
    expected = single_loaded.model.state_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(p, expected[name]), name


def test_unknown_weight_is_refused_by_name(single, single_loaded):
    weights = list(iterate_weights(single, show_progress=False))
    weights.append(("model.layers.0.mlp.bogus_proj.weight", torch.zeros(2, 2)))
    weights.append(("model.layers.9.self_attn.q_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(WeightLoadError, match="bogus_proj") as err:
        _fresh(single_loaded.config).load_weights(weights)
    assert "model.layers.9.self_attn.q_proj.weight" in str(err.value)


def test_missing_weight_is_reported(single, single_loaded):
    weights = [(n, t) for n, t in iterate_weights(single, show_progress=False)
               if n not in ("model.layers.1.mlp.experts.3.up_proj.weight", "model.norm.weight")]
    with pytest.raises(WeightLoadError, match="model.norm.weight") as err:
        _fresh(single_loaded.config).load_weights(weights)
    assert "model.layers.1.mlp.w13" in str(err.value)


def test_shape_mismatch_is_reported(single, single_loaded):
    weights = [(n, t[:-1] if n == "model.layers.0.self_attn.k_proj.bias" else t)
               for n, t in iterate_weights(single, show_progress=False)]
    with pytest.raises(WeightLoadError, match="k_proj.bias"):
        _fresh(single_loaded.config).load_weights(weights)


def test_mtp_weights_equal_the_files(single, single_loaded):
    files = _file_tensors(single)
    mtp = single_loaded.model.mtp
    n = single_loaded.config.num_hidden_layers
    inter = single_loaded.config.moe_intermediate_size
    p = f"model.layers.{n}."
    assert torch.equal(mtp.eh_proj.weight, files[p + "eh_proj.weight"])
    assert torch.equal(mtp.enorm.weight, files[p + "enorm.weight"])
    assert torch.equal(mtp.hnorm.weight, files[p + "hnorm.weight"])
    assert torch.equal(mtp.shared_head.norm.weight, files[p + "shared_head.norm.weight"])
    assert torch.equal(mtp.shared_head.head.weight, files[p + "shared_head.head.weight"])
    assert torch.equal(mtp.embed_tokens.weight, files[p + "embed_tokens.weight"])
    assert torch.equal(mtp.layer.self_attn.q_proj.bias, files[p + "self_attn.q_proj.bias"])
    assert torch.equal(mtp.layer.mlp.gate_weight, files[p + "mlp.gate.weight"])
    assert torch.equal(mtp.layer.mlp.e_score_correction_bias, files[p + "mlp.gate.e_score_correction_bias"])
    assert torch.equal(mtp.layer.mlp.w13[7, inter:], files[p + "mlp.experts.7.up_proj.weight"])
    assert torch.equal(mtp.layer.mlp.w2[2], files[p + "mlp.experts.2.down_proj.weight"])
    # The MTP layer's weights are its own, not the main stack's last layer.
    assert not torch.equal(mtp.layer.mlp.w2, single_loaded.model.model.layers[n - 1].mlp.w2)


def test_missing_mtp_weights_are_fine_partial_ones_are_not(tmp_path, single):
    d = make_checkpoint("glm4_moe", tmp_path / "nomtp", vocab_size=VOCAB, seed=5,
                        overrides={"num_nextn_predict_layers": 0})
    assert load_ours(d, with_mtp=True).model.mtp is None
    raw = json.loads((d / "config.json").read_text())
    raw["num_nextn_predict_layers"] = 1  # config announces an MTP layer the files lack
    (d / "config.json").write_text(json.dumps(raw))
    loaded = load_ours(d, with_mtp=True)
    assert loaded.config.num_nextn_predict_layers == 1 and loaded.model.mtp is None
    partial = [(n, t) for n, t in iterate_weights(single, show_progress=False) if n != "model.layers.3.eh_proj.weight"]
    with pytest.raises(WeightLoadError, match="eh_proj"):
        _fresh(loaded.config, with_mtp=True).load_weights(partial)


def test_without_mtp_no_mtp_parameters_exist_and_its_tensors_are_not_read(single, single_loaded, monkeypatch):
    from glmserve.engine import loader, weights

    n = single_loaded.config.num_hidden_layers
    read: list[str] = []
    real = weights.iterate_weights

    def recording(*args, **kwargs):
        for name, t in real(*args, **kwargs):
            read.append(name)
            yield name, t

    monkeypatch.setattr(loader, "iterate_weights", recording)
    plain = load_ours(single)  # with_mtp defaults to off
    assert plain.config.num_nextn_predict_layers == 1  # the checkpoint has an MTP layer...
    assert plain.model.mtp is None  # ...which is not built
    assert not [p for p, _ in plain.model.named_parameters() if p.startswith("mtp.")]
    mtp_files = [k for k in _file_tensors(single) if k.startswith(f"model.layers.{n}.")]
    assert mtp_files and not set(mtp_files) & set(read)  # never read from disk
    assert len(read) == len(_file_tensors(single)) - len(mtp_files)  # everything else was
    sizes = [sum(p.numel() for p in m.model.parameters()) for m in (plain, single_loaded)]
    assert sizes[0] < sizes[1]
    # The main model is unaffected: same weights, same logits.
    with_mtp = single_loaded.model.state_dict()
    for name, p in plain.model.state_dict().items():
        assert torch.equal(p, with_mtp[name]), name
    assert torch.equal(_logits(plain), _logits(single_loaded))


def test_engine_builds_mtp_only_for_speculative_decoding(single):
    from glmserve.engine.config import CacheConfig, EngineConfig
    from glmserve.engine.engine import LLMEngine

    def engine(**kw):
        return LLMEngine(EngineConfig(model=str(single), dtype="float32", device="cpu", show_progress=False,
                                      cache=CacheConfig(num_blocks=8), enable_cuda_graph=False, **kw))

    assert EngineConfig(model="m").speculative_algorithm == "none"
    assert engine().loaded.model.mtp is None
    assert engine(speculative_algorithm="mtp").loaded.model.mtp is not None


def test_dummy_load_reads_no_files(tmp_path):
    d = make_checkpoint("glm4_moe", tmp_path / "dummy", vocab_size=VOCAB, seed=7)
    for f in d.glob("*.safetensors"):
        f.unlink()
    loaded = load_ours(d, load_format="dummy")
    norm = loaded.model.model.layers[0].input_layernorm.weight
    assert (norm - 1).abs().max() < 0.1
    assert loaded.model.model.layers[1].self_attn.q_proj.weight.std() < 0.05
    logits = _logits(loaded)
    assert torch.isfinite(logits).all() and logits.std() > 0
    with pytest.raises(FileNotFoundError):
        load_ours(d)  # the real weights are gone: only dummy loading works


def test_presets_load_only_as_dummy():
    with pytest.raises(ValueError, match="dummy"):
        load_model("zai-org/GLM-4.7-Flash", load_format="safetensors", show_progress=False)
    with pytest.raises(FileNotFoundError):
        load_model("no-such-model-or-dir", show_progress=False)
    with pytest.raises(ValueError, match="load_format"):
        load_model("GLM-4.7", load_format="pickle", show_progress=False)


def test_progress_bar_can_be_disabled(single, capsys):
    list(iterate_weights(single, show_progress=False))
    assert "Loading weights" not in capsys.readouterr().err
    list(iterate_weights(single, show_progress=True))
    assert "Loading weights" in capsys.readouterr().err


def test_dtype_and_device_resolution(single):
    cfg = read_model_config(single)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cfg, cpu) == torch.float32  # the tiny checkpoint is stored in fp32
    assert resolve_dtype("auto", cfg.replace(checkpoint_dtype="bfloat16"), cpu) == torch.bfloat16
    fp8 = cfg.replace(quant=QuantConfig(method="fp8"))
    assert resolve_dtype("auto", fp8, cpu) == torch.float32 and resolve_dtype("auto", fp8, cuda) == torch.bfloat16
    assert resolve_dtype("float16", cfg, cpu) == torch.float16
    with pytest.raises(ValueError):
        resolve_dtype("int8", cfg, cpu)
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bfloat16_load_keeps_router_in_fp32(single, single_loaded):
    bf = load_ours(single, dtype="bfloat16")
    moe = bf.model.model.layers[1].mlp
    assert bf.model.model.embed_tokens.weight.dtype == torch.bfloat16 and moe.w13.dtype == torch.bfloat16
    assert moe.gate_weight.dtype == torch.float32 and moe.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(moe.e_score_correction_bias, single_loaded.model.model.layers[1].mlp.e_score_correction_bias)
    ref = _logits(single_loaded)
    got = run_chunks(bf.model, bf.config, IDS, [len(IDS)], dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    # bf16 keeps the argmax of most positions of a random tiny model (loose, it is a smoke check).
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.7


def test_engine_seed_picks_the_dummy_weights(single):
    """`--seed` reaches the dummy loader: the same seed gives the same weights, another seed others."""
    from glmserve.engine.config import CacheConfig, EngineConfig
    from glmserve.engine.engine import LLMEngine

    def weight(seed):
        eng = LLMEngine(EngineConfig(model=str(single), dtype="float32", device="cpu", show_progress=False,
                                     load_format="dummy", seed=seed, cache=CacheConfig(num_blocks=8),
                                     enable_cuda_graph=False))
        return eng.loaded.model.model.layers[1].self_attn.q_proj.weight

    assert torch.equal(weight(3), weight(3))
    assert not torch.equal(weight(3), weight(4))
