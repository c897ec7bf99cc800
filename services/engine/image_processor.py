"""GLM-4V image preprocessing: a PIL image -> flattened patches and its patch grid.

The semantics of transformers' Glm4vImageProcessor (tested equal to it): convert to RGB (transparency
composited onto white), resize with PIL's bicubic filter to the nearest size whose sides are multiples of
patch_size * merge_size and whose area lies in [min_pixels, max_pixels], scale to [0, 1], normalize per
channel, then cut into patches laid out block-major over merge x merge blocks, each patch repeated
temporal_patch_size times (an image is a one-frame video to the 3-D patch embedding).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from glmserve.engine.vision_config import ImageProcessorConfig

MAX_ASPECT_RATIO = 200


class ImageError(ValueError):
    """An image that cannot be processed (too small an area after resizing, extreme aspect ratio, ...)."""


@dataclass(frozen=True)
class ProcessedImage:
    patches: np.ndarray  # [grid_t * grid_h * grid_w, C * temporal_patch_size * patch_size**2] float32
    grid_thw: tuple[int, int, int]  # in patches
    content_hash: str  # of the decoded pixels: the encoder cache and prefix-cache key of this image

    def num_tokens(self, merge_size: int) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (merge_size * merge_size)


def target_size(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """(height, width) the image is resized to: transformers' smart_resize for a 2-frame (one image) input."""
    factor = cfg.patch_size * cfg.merge_size
    frames = cfg.temporal_patch_size
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"image aspect ratio must be below {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width):.0f}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = frames  # one image fills the temporal patch exactly
    if t_bar * h_bar * w_bar > cfg.max_pixels:
        beta = math.sqrt(frames * height * width / cfg.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image):
    """RGB copy of a PIL image; transparency is composited onto white, as transformers does."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def patchify(chw: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, int, int]:
    """[C, H, W] -> ([grid_h * grid_w, C * tp * p * p], grid_h, grid_w), block-major over merge blocks."""
    c, height, width = chw.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    x = chw.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (block row, block col, row in block, col in block, C, py, px)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))  # the frame, repeated over time
    return np.ascontiguousarray(x).reshape(gh * gw, c * tp * p * p), gh, gw


def process_image(image, cfg: ImageProcessorConfig) -> ProcessedImage:
    """A PIL image -> its patches, grid and content hash."""
    from PIL import Image

    rgb = to_rgb(image)
    content_hash = hashlib.blake2b(rgb.tobytes() + repr(rgb.size).encode(), digest_size=16).hexdigest()
    if cfg.do_resize:
        h, w = target_size(rgb.height, rgb.width, cfg)
        if (h, w) != (rgb.height, rgb.width):
            rgb = rgb.resize((w, h), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(rgb)  # [H, W, 3] uint8
    x = pixels.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else pixels
    x = x.astype(np.float32)
    if cfg.do_normalize:
        mean = np.array(cfg.image_mean, dtype=np.float32)
        std = np.array(cfg.image_std, dtype=np.float32)
        x = (x - mean) / std
    factor = cfg.patch_size * cfg.merge_size
    if x.shape[0] % factor or x.shape[1] % factor:
        raise ImageError(f"image of {x.shape[1]}x{x.shape[0]} pixels is not a multiple of {factor} (do_resize off?)")
    patches, gh, gw = patchify(x.transpose(2, 0, 1), cfg)
    return ProcessedImage(patches.astype(np.float32), (1, gh, gw), content_hash)
