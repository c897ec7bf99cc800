"""Frozen configuration of a GLM-4.xV vision tower and of its image preprocessing.

`VisionConfig` is parsed from the `vision_config` of a `glm4v_moe` config.json plus the image token ids at its
top level; `ImageProcessorConfig` from preprocessor_config.json, with transformers' GLM-4V image processor
defaults for every key the file leaves out (so a checkpoint's file means what transformers makes of it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: the GLM-4V image processor's defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    image_size: int
    rms_norm_eps: float
    attention_bias: bool
    rope_theta: float
    hidden_act: str
    # Token ids of the text model: the placeholder repeated once per merged patch, and its brackets.
    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


def parse_vision_config(raw: dict[str, Any]) -> VisionConfig:
    """`raw` is the whole config.json of a glm4v_moe checkpoint."""
    v = raw.get("vision_config") or {}
    rope = v.get("rope_parameters") or {}
    if v.get("hidden_act", "silu") != "silu":
        raise ValueError(f"vision_config.hidden_act {v.get('hidden_act')!r} is not supported (GLM-4.xV uses silu)")
    image_size = v.get("image_size", 336)
    patch_size = v.get("patch_size", 14)
    temporal = v.get("temporal_patch_size", 2)
    for name, value in (("image_size", image_size), ("patch_size", patch_size), ("temporal_patch_size", temporal)):
        if not isinstance(value, int):
            raise ValueError(f"vision_config.{name} must be one integer, got {value!r}")
    return VisionConfig(
        depth=int(v.get("depth", 24)),
        hidden_size=int(v.get("hidden_size", 1536)),
        num_heads=int(v.get("num_heads", 12)),
        intermediate_size=int(v.get("intermediate_size", 13696)),
        out_hidden_size=int(v.get("out_hidden_size", 4096)),
        patch_size=int(patch_size),
        temporal_patch_size=int(temporal),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        in_channels=int(v.get("in_channels", 3)),
        image_size=int(image_size),
        rms_norm_eps=float(v.get("rms_norm_eps", 1e-5)),
        attention_bias=bool(v.get("attention_bias", False)),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        hidden_act="silu",
        image_token_id=int(raw.get("image_token_id", 151363)),
        image_start_token_id=int(raw.get("image_start_token_id", 151339)),
        image_end_token_id=int(raw.get("image_end_token_id", 151340)),
    )


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What transformers' Glm4vImageProcessor does to an image, as numbers."""

    min_pixels: int = 112 * 112  # size.shortest_edge
    max_pixels: int = 28 * 28 * 15000  # size.longest_edge
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ImageProcessorConfig":
        """preprocessor_config.json of `model_dir`, or the defaults when there is none."""
        path = Path(model_dir) / "preprocessor_config.json"
        return cls.from_dict(json.loads(path.read_text())) if path.exists() else cls()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ImageProcessorConfig":
        d = cls()
        size = raw.get("size") or {}
        if raw.get("resample", 3) != 3:  # PIL's BICUBIC: the only filter this preprocessing implements
            raise ValueError(f"preprocessor_config.json resample={raw['resample']!r} is not supported (3 = bicubic)")
        if raw.get("do_convert_rgb", True) is not True:
            raise ValueError("preprocessor_config.json do_convert_rgb=false is not supported")
        return cls(
            min_pixels=int(size.get("shortest_edge", raw.get("min_pixels", d.min_pixels))),
            max_pixels=int(size.get("longest_edge", raw.get("max_pixels", d.max_pixels))),
            patch_size=int(raw.get("patch_size", d.patch_size)),
            temporal_patch_size=int(raw.get("temporal_patch_size", d.temporal_patch_size)),
            merge_size=int(raw.get("merge_size", d.merge_size)),
            rescale_factor=float(raw.get("rescale_factor", d.rescale_factor)),
            image_mean=tuple(float(x) for x in raw.get("image_mean", d.image_mean)),
            image_std=tuple(float(x) for x in raw.get("image_std", d.image_std)),
            do_resize=bool(raw.get("do_resize", True)),
            do_rescale=bool(raw.get("do_rescale", True)),
            do_normalize=bool(raw.get("do_normalize", True)),
        )
