"""Model classes by architecture (config.py's `arch`), imported lazily so one arch's code never loads another's."""

from __future__ import annotations

import importlib

from torch import nn

_MODELS: dict[str, str] = {
    "glm4_moe": "glmserve.engine.models.glm4_moe:Glm4MoeForCausalLM",
    "glm4_moe_lite": "glmserve.engine.models.glm4_moe_lite:Glm4MoeLiteForCausalLM",
    "glm4v_moe": "glmserve.engine.models.glm4v_moe:Glm4vMoeForConditionalGeneration",
}


def supported_archs() -> list[str]:
    return sorted(_MODELS)


def model_class(arch: str) -> type[nn.Module]:
    """The class for `arch`: constructor (cfg: ModelConfig, backend: AttentionBackend)."""
    try:
        target = _MODELS[arch]
    except KeyError:
        raise ValueError(f"no model class for arch {arch!r}; supported: {', '.join(supported_archs())}") from None
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)
