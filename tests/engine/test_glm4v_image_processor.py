"""Our GLM-4V image preprocessing equals transformers' Glm4vImageProcessor (its PIL backend): same grids,
same pixel values, on sizes that upscale, downscale, keep, and have extreme aspect ratios; on RGBA (white
composite), grayscale and palette images; with the published defaults and with a checkpoint's file."""

from __future__ import annotations

import numpy as np
import pytest

from glmserve.engine.image_processor import ImageError, process_image, target_size
from glmserve.engine.tiny_vl_checkpoint import PREPROCESSOR
from glmserve.engine.vision_config import ImageProcessorConfig
from tests.engine.vl_reference import random_image

SIZES = [(40, 56), (90, 70), (8, 8), (17, 300), (128, 128), (33, 47)]


def _hf(raw: dict | None):
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    if raw is None:
        return Glm4vImageProcessorPil()
    kw = {k: v for k, v in raw.items() if k != "image_processor_type"}
    return Glm4vImageProcessorPil(**kw)


@pytest.mark.parametrize("raw", [PREPROCESSOR, None], ids=["tiny_checkpoint", "published_defaults"])
@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_patches_equal_transformers(raw, hw):
    img = random_image(*hw, seed=hw[0] * 1000 + hw[1])
    cfg = ImageProcessorConfig.from_dict(raw) if raw is not None else ImageProcessorConfig()
    ref = _hf(raw)(images=[img], return_tensors="np")
    got = process_image(img, cfg)
    assert list(ref["image_grid_thw"][0]) == list(got.grid_thw)
    assert got.patches.shape == ref["pixel_values"].shape
    assert np.abs(got.patches - ref["pixel_values"]).max() == 0.0


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA"])
def test_other_modes_equal_transformers(mode):
    img = random_image(37, 61, seed=4, mode=mode)
    if mode in ("RGBA", "LA"):  # some transparent pixels: composited onto white
        alpha = np.asarray(img.getchannel("A")).copy()
        alpha[:10] = 0
        img.putalpha(__import__("PIL.Image", fromlist=["Image"]).fromarray(alpha))
    ref = _hf(PREPROCESSOR)(images=[img], return_tensors="np")
    got = process_image(img, ImageProcessorConfig.from_dict(PREPROCESSOR))
    assert np.abs(got.patches - ref["pixel_values"]).max() == 0.0


def test_content_hash_is_of_pixels():
    a, b = random_image(40, 40, seed=1), random_image(40, 40, seed=2)
    cfg = ImageProcessorConfig.from_dict(PREPROCESSOR)
    assert process_image(a, cfg).content_hash == process_image(a.copy(), cfg).content_hash
    assert process_image(a, cfg).content_hash != process_image(b, cfg).content_hash


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(ImageError, match="aspect ratio"):
        target_size(10, 3000, ImageProcessorConfig())


def test_unsupported_preprocessor_settings_are_refused():
    with pytest.raises(ValueError, match="resample"):
        ImageProcessorConfig.from_dict({**PREPROCESSOR, "resample": 2})
