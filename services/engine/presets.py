"""Built-in configs of the real GLM models (published config.json layout), for dummy-weight runs at full size.

Names match case-insensitively, with or without the "zai-org/" prefix: "GLM-4.7-Flash", "zai-org/glm-4.5-air".
No weights ship with a preset, so a preset only loads with load_format="dummy".
"""

from __future__ import annotations

import json
from pathlib import Path

from glmserve.engine.config import ModelConfig, parse_hf_config

_DIR = Path(__file__).parent / "presets"
_PREFIX = "zai-org/"


def preset_names() -> list[str]:
    return sorted(p.stem for p in _DIR.glob("*.json"))


def canonical_preset(name: str) -> str | None:
    """The preset's canonical name for `name`, or None when it names no preset."""
    key = name.strip().lower()
    if key.startswith(_PREFIX):
        key = key[len(_PREFIX):]
    for preset in preset_names():
        if preset.lower() == key:
            return preset
    return None


def preset_raw_config(name: str) -> dict:
    """The config.json dict of preset `name`."""
    preset = canonical_preset(name)
    if preset is None:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return json.loads((_DIR / f"{preset}.json").read_text())


def preset_config(name: str) -> ModelConfig:
    return parse_hf_config(preset_raw_config(name))
