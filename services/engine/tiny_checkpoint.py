"""Tiny random GLM checkpoints in Hugging Face format, for tests and the built-in demo model.

The weights come from instantiating transformers' own model class (so transformers loads the directory
back) with EVERY parameter randomised, non-default structure (group-limited routing, routed scaling,
unnormalised top-k, QK norm, attention bias, dense first layer, head counts that are not powers of two)
and the MTP layer written at index `num_hidden_layers`, the way the published checkpoints store it.
"""

from __future__ import annotations

import copy
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn

# Small GQA model: 6 query heads over 2 KV heads, 12 experts in 4 groups of 3, 2 groups kept.
_GLM4_MOE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
    head_dim=16, moe_intermediate_size=32, n_routed_experts=12, num_experts_per_tok=3, n_shared_experts=1,
    n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=False, routed_scaling_factor=1.7,
    use_qk_norm=True, attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    tie_word_embeddings=False,
)

# Small MLA model with the same routing shape; 6 heads, interleaved RoPE.
_GLM4_MOE_LITE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=6,
    q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    moe_intermediate_size=32, n_routed_experts=12, num_experts_per_tok=3, n_shared_experts=1,
    n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.8, rms_norm_eps=1e-5,
    max_position_embeddings=512, rope_interleave=True, attention_bias=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    mlp_layer_types=["dense", "sparse", "sparse"], tie_word_embeddings=False,
)

# Linear layers stored as FP8 in compressed-tensors checkpoints (router gate, norms, embeddings and heads
# stay in full precision).
_FP8_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "eh_proj",
    "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
)


def tiny_hf_config(arch: str, vocab_size: int, overrides: dict | None = None, **token_ids: Any):
    """The transformers config object of the tiny model of `arch`."""
    from transformers import Glm4MoeConfig, Glm4MoeLiteConfig

    if arch == "glm4_moe":
        base, cls = copy.deepcopy(_GLM4_MOE), Glm4MoeConfig
    elif arch == "glm4_moe_lite":
        base, cls = copy.deepcopy(_GLM4_MOE_LITE), Glm4MoeLiteConfig
    else:
        raise ValueError(f"unknown arch {arch!r}; expected glm4_moe or glm4_moe_lite")
    base.update(overrides or {})
    if arch == "glm4_moe_lite" and "num_hidden_layers" in (overrides or {}) and "mlp_layer_types" not in overrides:
        base["mlp_layer_types"] = ["dense"] + ["sparse"] * (base["num_hidden_layers"] - 1)
    base["vocab_size"] = vocab_size
    base.update(token_ids)
    return cls(**base)


def _randomise_(tensors: Iterable[tuple[str, torch.Tensor]], gen: torch.Generator) -> None:
    """Fill every tensor: norms near 1, biases and correction bias small but nonzero, matrices ~1/sqrt(fan_in)."""
    for name, t in tensors:
        with torch.no_grad():
            if t.dim() == 1 and name.endswith("weight"):
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=gen))
            elif t.dim() == 1:
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * t.shape[-1] ** -0.5)


@contextmanager
def _quiet_transformers():
    """No transformers progress bars while we write (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _random_model(hf_cfg, seed: int):
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    _randomise_(model.named_parameters(), gen)
    _randomise_([(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")], gen)
    return model.eval(), gen


def _mtp_layer_config(hf_cfg):
    """Config whose layer `num_hidden_layers` exists and is an MoE layer (the MTP layer always is)."""
    cfg = copy.deepcopy(hf_cfg)
    n = hf_cfg.num_hidden_layers
    cfg.num_hidden_layers = n + 1
    if getattr(cfg, "mlp_layer_types", None) is not None:
        cfg.mlp_layer_types = list(hf_cfg.mlp_layer_types) + ["sparse"]
    return cfg


def _checkpoint_names(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory names -> published checkpoint names (fused 3-D experts split per expert)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{base}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}{base}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[prefix + name] = t.detach().clone()
    return out


def _mtp_weights(model, hf_cfg, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The MTP layer in the published layout: a full decoder layer plus enorm/hnorm/eh_proj/shared_head.

    embed_tokens and shared_head.head are copies of the main model's, as in the published checkpoints.
    """
    n, h = hf_cfg.num_hidden_layers, hf_cfg.hidden_size
    layer_cls = type(model.model.layers[-1])
    layer = layer_cls(_mtp_layer_config(hf_cfg), n).float()
    tensors = dict(layer.named_parameters())
    tensors.update({k: v for k, v in layer.named_buffers() if k.endswith("e_score_correction_bias")})
    tensors["enorm.weight"] = torch.empty(h)
    tensors["hnorm.weight"] = torch.empty(h)
    tensors["eh_proj.weight"] = torch.empty(h, 2 * h)
    tensors["shared_head.norm.weight"] = torch.empty(h)
    _randomise_(sorted(tensors.items()), gen)
    tensors["embed_tokens.weight"] = model.model.embed_tokens.weight
    tensors["shared_head.head.weight"] = model.lm_head.weight
    return _checkpoint_names(f"model.layers.{n}.", tensors)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric FP8: (float8_e4m3fn weight, float32 scale [out, 1])."""
    amax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    scale = (amax / FP8_MAX).float()
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _is_fp8_target(name: str, t: torch.Tensor) -> bool:
    parts = name.split(".")
    return t.dim() == 2 and parts[-1] == "weight" and len(parts) >= 2 and parts[-2] in _FP8_MODULES


def _quantize_all(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if _is_fp8_target(name, t):
            out[name], out[name + "_scale"] = quantize_fp8(t.float())
        else:
            out[name] = t
    return out


def fp8_quantization_config() -> dict:
    """compressed-tensors config of an FP8 checkpoint: per-channel weights, dynamic per-token activations."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": "float-quantized",
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                            "dynamic": False, "group_size": None},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                      "dynamic": True, "group_size": None},
                "output_activations": None,
            }
        },
        "ignore": ["lm_head", "re:.*mlp\\.gate$", "re:.*shared_head\\.head$"],
        "kv_cache_scheme": None,
    }


def _write_safetensors(weights: dict[str, torch.Tensor], out: Path, shards: int) -> list[str]:
    from safetensors.torch import save_file

    names = sorted(weights)
    if shards <= 1:
        save_file({k: weights[k].contiguous() for k in names}, str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    per = -(-len(names) // shards)
    files, weight_map, total = [], {}, 0
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: weights[k].contiguous() for k in part}, str(out / fname), metadata={"format": "pt"})
        files.append(fname)
        for k in part:
            weight_map[k] = fname
            total += weights[k].numel() * weights[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def _config_json(raw: dict, arch: str, layout: str, dtype: str, num_mtp: int) -> dict:
    """Rewrite the config.json transformers saved into the requested layout."""
    raw = dict(raw)
    for k in ("transformers_version", "_name_or_path", "output_router_logits", "use_cache", "dtype", "torch_dtype"):
        raw.pop(k, None)
    raw["architectures"] = ["Glm4MoeForCausalLM" if arch == "glm4_moe" else "Glm4MoeLiteForCausalLM"]
    raw["model_type"] = arch
    raw["num_nextn_predict_layers"] = num_mtp
    raw.pop("num_mtp_layers", None)
    if arch == "glm4_moe_lite":
        raw.pop("qk_head_dim", None)
    if layout == "published":
        rope = raw.pop("rope_parameters") or {}
        raw["rope_theta"] = rope.get("rope_theta", 10000.0)
        if "partial_rotary_factor" in rope:
            raw["partial_rotary_factor"] = rope["partial_rotary_factor"]
        if arch == "glm4_moe_lite":
            types = raw.pop("mlp_layer_types")
            raw["first_k_dense_replace"] = types.index("sparse") if "sparse" in types else len(types)
            raw["rope_scaling"] = None
        raw["torch_dtype"] = dtype
    elif layout == "transformers":
        raw["dtype"] = dtype
    else:
        raise ValueError(f"config_layout must be 'transformers' or 'published', not {layout!r}")
    return raw


def write_tiny_checkpoint(
    arch: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 256,
    eos_token_ids: Iterable[int] = (1,),
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
    shards: int = 1,
    fp8: bool = False,
    config_layout: str = "transformers",
    overrides: dict | None = None,
) -> dict:
    """Write config.json, generation_config.json and safetensors for a tiny random `arch` model.

    Returns {"model_dir", "config" (the config.json dict), "files", "weight_names", "num_params"}.
    """
    if arch == "glm4v_moe":  # the vision-language model has its own writer
        from glmserve.engine.tiny_vl_checkpoint import write_tiny_vl_checkpoint

        return write_tiny_vl_checkpoint(out_dir, seed=seed, vocab_size=vocab_size, eos_token_ids=eos_token_ids,
                                        bos_token_id=bos_token_id, pad_token_id=pad_token_id, overrides=overrides,
                                        shards=shards if shards > 1 else 0, fp8=fp8, config_layout=config_layout)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    dtype = str(overrides.pop("torch_dtype", overrides.pop("dtype", "float32")))
    num_mtp = int(overrides.pop("num_nextn_predict_layers", 1))
    eos = [int(e) for e in eos_token_ids]
    hf_cfg = tiny_hf_config(
        arch, vocab_size, overrides, eos_token_id=eos, bos_token_id=bos_token_id, pad_token_id=pad_token_id
    )
    model, gen = _random_model(hf_cfg, seed)
    # Let transformers write its own checkpoint names, then read them back: what it loads is what we ship.
    with tempfile.TemporaryDirectory() as tmp, _quiet_transformers():
        model.save_pretrained(tmp)
        saved_config = json.loads((Path(tmp) / "config.json").read_text())
        from safetensors.torch import load_file

        weights: dict[str, torch.Tensor] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            weights.update(load_file(str(f)))
    if num_mtp > 0:
        weights.update(_mtp_weights(model, hf_cfg, gen))
    torch_dtype = getattr(torch, dtype)
    weights = {k: (v.to(torch_dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v)
               for k, v in weights.items()}
    config = _config_json(saved_config, arch, config_layout, dtype, num_mtp)
    if fp8:
        weights = _quantize_all(weights)
        config["quantization_config"] = fp8_quantization_config()
    files = _write_safetensors(weights, out, shards)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen_cfg = {"eos_token_id": eos, "do_sample": False}
    if bos_token_id is not None:
        gen_cfg["bos_token_id"] = bos_token_id
    if pad_token_id is not None:
        gen_cfg["pad_token_id"] = pad_token_id
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    return {
        "model_dir": out,
        "config": config,
        "files": files,
        "weight_names": sorted(weights),
        "num_params": sum(v.numel() for v in weights.values()),
    }
