"""config.json parsing (published and transformers layouts), generation_config, presets."""

from __future__ import annotations

import json

import pytest

from glmserve.engine.config import ModelConfig
from glmserve.engine.loader import read_model_config
from glmserve.engine.presets import canonical_preset, preset_config, preset_names, preset_raw_config
from glmserve.engine.tiny_checkpoint import write_tiny_checkpoint


@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
def test_both_layouts_parse_identically(tmp_path, arch):
    configs = {}
    for layout in ("transformers", "published"):
        info = write_tiny_checkpoint(arch, tmp_path / layout, vocab_size=150, eos_token_ids=[3, 4],
                                     config_layout=layout)
        raw = info["config"]
        if layout == "published":
            assert "rope_parameters" not in raw and raw["rope_theta"] == 10000.0
        else:
            assert raw["rope_parameters"]["rope_theta"] == 10000.0 and "rope_theta" not in raw
        configs[layout] = ModelConfig.from_dir(info["model_dir"])
    assert configs["transformers"] == configs["published"]
    cfg = configs["published"]
    assert cfg.arch == arch and cfg.eos_token_ids == (3, 4) and cfg.checkpoint_dtype == "float32"
    assert cfg.dense_layers == (True, False, False) and cfg.num_nextn_predict_layers == 1
    if arch == "glm4_moe":
        assert cfg.rotary_dim == cfg.head_dim // 2 and cfg.use_qk_norm and cfg.attention_bias
    else:
        assert cfg.is_mla and cfg.rotary_dim == cfg.qk_rope_head_dim and cfg.rope_interleave


def test_generation_config_supplies_stop_ids(tmp_path):
    info = write_tiny_checkpoint("glm4_moe", tmp_path, vocab_size=150, eos_token_ids=[5, 6], pad_token_id=7)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["eos_token_id"] = 5
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = read_model_config(info["model_dir"])
    assert cfg.eos_token_ids == (5, 6) and cfg.pad_token_id == 7


def test_preset_names_match_loosely():
    assert preset_names() == ["GLM-4.5-Air", "GLM-4.7", "GLM-4.7-Flash"]
    assert canonical_preset("glm-4.7-flash") == "GLM-4.7-Flash"
    assert canonical_preset("zai-org/GLM-4.5-AIR") == "GLM-4.5-Air"
    assert canonical_preset("ZAI-ORG/glm-4.7") == "GLM-4.7"
    assert canonical_preset("GLM-4.6") is None
    with pytest.raises(KeyError, match="GLM-4.7-Flash"):
        preset_raw_config("nope")


def test_presets_hold_the_published_values():
    air = preset_config("GLM-4.5-Air")
    assert (air.arch, air.hidden_size, air.num_hidden_layers, air.n_routed_experts) == ("glm4_moe", 4096, 46, 128)
    assert (air.num_experts_per_tok, air.moe_intermediate_size, air.routed_scaling_factor) == (8, 1408, 1.0)
    assert air.dense_layers[:2] == (True, False) and not air.use_qk_norm and air.attention_bias
    assert (air.num_attention_heads, air.num_key_value_heads, air.head_dim, air.rotary_dim) == (96, 8, 128, 64)
    assert air.rope_theta == 1e6 and air.vocab_size == 151552 and air.eos_token_ids == (151329, 151336, 151338)

    big = preset_config("GLM-4.7")
    assert (big.hidden_size, big.num_hidden_layers, big.n_routed_experts, big.moe_intermediate_size) == (5120, 92, 160, 1536)
    assert big.dense_layers[:4] == (True, True, True, False) and big.routed_scaling_factor == 2.5 and big.use_qk_norm

    flash = preset_config("GLM-4.7-Flash")
    assert flash.is_mla and (flash.hidden_size, flash.num_hidden_layers, flash.num_attention_heads) == (2048, 47, 20)
    assert (flash.q_lora_rank, flash.kv_lora_rank, flash.qk_nope_head_dim, flash.qk_rope_head_dim,
            flash.v_head_dim) == (768, 512, 192, 64, 256)
    assert (flash.n_routed_experts, flash.num_experts_per_tok, flash.routed_scaling_factor) == (64, 4, 1.8)
    assert flash.intermediate_size == 10240 and flash.dense_layers[:2] == (True, False)
    assert flash.vocab_size == 154880 and flash.max_position_embeddings == 202752 and flash.rotary_dim == 64
    for name in preset_names():
        cfg = preset_config(name)
        assert cfg.num_nextn_predict_layers == 1 and cfg.checkpoint_dtype == "bfloat16" and cfg.rope_scaling is None


@pytest.mark.parametrize("name", ["GLM-4.5-Air", "GLM-4.7", "GLM-4.7-Flash"])
def test_presets_read_the_same_by_transformers(tmp_path, name):
    """transformers reads the published layout into its own; ours must agree with both."""
    from transformers import AutoConfig

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(preset_raw_config(name)))
    AutoConfig.from_pretrained(str(tmp_path / "src")).save_pretrained(str(tmp_path / "hf"))
    via_transformers = ModelConfig.from_dir(tmp_path / "hf")
    # transformers fills in its class default bos id (0 for glm4_moe_lite); the published config has none.
    assert via_transformers.replace(checkpoint_dtype="bfloat16", bos_token_id=None) == preset_config(name)
