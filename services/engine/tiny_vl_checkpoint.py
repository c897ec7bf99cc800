"""A tiny random GLM-4.xV (`glm4v_moe`) checkpoint: transformers' own Glm4vMoeForConditionalGeneration with
every parameter randomised, saved by transformers (so it loads the directory back), plus the
preprocessor_config.json its GLM-4V image processor reads.

Shapes are small but not degenerate: 3 query heads over 1 KV head with 32-dim heads (16 rotary dims, so
M-RoPE sections [2, 3, 3] over 8 frequencies), group-limited routing, a dense first layer, attention bias;
a 2-block tower with 4-pixel patches whose position table (6 x 6) is resampled for every image size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

_TEXT = dict(
    hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1,
    moe_intermediate_size=32, n_routed_experts=12, num_experts_per_tok=3, n_shared_experts=1,
    n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=False, routed_scaling_factor=1.7,
    attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=1024,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                     "mrope_section": [2, 3, 3]},
)
_VISION = dict(
    depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=96, patch_size=4,
    temporal_patch_size=2, spatial_merge_size=2, in_channels=3, image_size=24, rms_norm_eps=1e-5,
    attention_bias=True, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
)
# The image processor of the tiny model: 8-pixel resize factor; images above 2 x 64 x 64 pixels shrink.
PREPROCESSOR = {
    "image_processor_type": "Glm4vImageProcessor",
    "size": {"shortest_edge": 256, "longest_edge": 8192},
    "patch_size": 4, "temporal_patch_size": 2, "merge_size": 2,
    "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
# Special tokens of the tiny tokenizer (tiny_assets/tokenizer.json).
_TOKEN_IDS = dict(image_token_id=998, video_token_id=999, image_start_token_id=977, image_end_token_id=978,
                  video_start_token_id=979, video_end_token_id=980)


def tiny_vl_hf_config(vocab_size: int, eos: list[int], bos: int | None, pad: int | None, overrides: dict | None):
    from transformers import Glm4vMoeConfig

    text = dict(_TEXT, vocab_size=vocab_size, eos_token_id=eos, bos_token_id=bos, pad_token_id=pad)
    text.update((overrides or {}).get("text_config", {}))
    vision = dict(_VISION, **(overrides or {}).get("vision_config", {}))
    return Glm4vMoeConfig(text_config=text, vision_config=vision, **_TOKEN_IDS)


def _quantize_text_model(path: Path) -> dict:
    """Rewrite `path` as the FP8 releases (GLM-4.5V-FP8) store it: the text model's linear layers and experts
    in FP8 with per-channel scales; the vision tower, lm_head and router gates as they were. Returns the
    quantization_config."""
    from safetensors.torch import load_file, save_file

    from glmserve.engine.tiny_checkpoint import _quantize_all, fp8_quantization_config

    weights = load_file(str(path))
    visual = {k: v for k, v in weights.items() if k.startswith("model.visual.")}
    text = _quantize_all({k: v for k, v in weights.items() if k not in visual})
    save_file({**text, **visual}, str(path), metadata={"format": "pt"})
    q = fp8_quantization_config()
    q["ignore"] = [*q["ignore"], "re:model\\.visual\\..*"]
    return q


def write_tiny_vl_checkpoint(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 1000,
                             eos_token_ids: Iterable[int] = (1,), bos_token_id: int | None = None,
                             pad_token_id: int | None = None, overrides: dict | None = None, **unsupported) -> dict:
    """config.json, generation_config.json, preprocessor_config.json and model.safetensors (fp8=True: the
    text model quantized as in the FP8 releases)."""
    from transformers import Glm4vMoeForConditionalGeneration

    from glmserve.engine.tiny_checkpoint import _quiet_transformers, _randomise_

    fp8 = bool(unsupported.pop("fp8", False))
    if unsupported.get("shards") or unsupported.get("config_layout", "transformers") != "transformers":
        raise ValueError(f"the tiny glm4v_moe checkpoint has one layout (no shards or published config): {unsupported}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = [int(e) for e in eos_token_ids]
    hf_cfg = tiny_vl_hf_config(vocab_size, eos, bos_token_id, pad_token_id, overrides)
    gen = torch.Generator().manual_seed(seed)
    model = Glm4vMoeForConditionalGeneration(hf_cfg).float().eval()
    _randomise_(model.named_parameters(), gen)
    _randomise_([(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")], gen)
    with _quiet_transformers():
        model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    for k in ("transformers_version", "_name_or_path", "use_cache"):
        config.pop(k, None)
    if fp8:
        config["quantization_config"] = _quantize_text_model(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen_cfg = {"eos_token_id": eos, "do_sample": False}
    for key, value in (("bos_token_id", bos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None:
            gen_cfg[key] = value
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return {"model_dir": out, "config": config, "num_params": sum(p.numel() for p in model.parameters())}
