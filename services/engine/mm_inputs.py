"""A prompt's images: where their tokens sit in the prompt, and the M-RoPE positions of every prompt token.

The prompt already holds each image as a run of `image_token_id` placeholders, one per merged patch (the
chat template writes `<|begin_of_image|><|image|><|end_of_image|>`; `expand_image_tokens` widens the one
placeholder to the image's count). Positions follow transformers' Glm4vMoeModel.get_rope_index: text tokens
count up on all three axes; an image's tokens share t = the next position and count rows (h) and columns
(w) from it; after the image, text resumes at that position + max(rows, cols). Tokens past the prompt (the
output) sit at their index + `delta`, the same offset on every axis.

Torch-free: the router builds these too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from glmserve.engine.image_processor import ProcessedImage, process_image
from glmserve.engine.vision_config import ImageProcessorConfig, VisionConfig
from glmserve.prefix_hash import ROOT_HASH, hash_block


class MultiModalError(ValueError):
    """Images and prompt disagree (placeholder count, too many images, ...)."""


@dataclass(frozen=True)
class PromptImage:
    image: ProcessedImage
    offset: int  # index of its first placeholder token in the prompt
    num_tokens: int

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


@dataclass(frozen=True)
class MultiModalPrompt:
    images: tuple[PromptImage, ...]
    positions: np.ndarray  # [3, num_prompt_tokens] int64
    delta: int  # M-RoPE offset of every token past the prompt

    def positions_of(self, start: int, n: int) -> np.ndarray:
        """[3, n] positions of tokens start .. start+n-1 (prompt or output)."""
        p = self.positions.shape[1]
        if start + n <= p:
            return self.positions[:, start : start + n]
        out = np.empty((3, n), dtype=np.int64)
        k = max(0, p - start)
        out[:, :k] = self.positions[:, start:p]
        out[:, k:] = np.arange(max(start, p), start + n, dtype=np.int64) + self.delta
        return out

    def images_in(self, start: int, end: int) -> list[PromptImage]:
        return [im for im in self.images if im.offset < end and im.end > start]


def expand_image_tokens(token_ids: list[int], images: list[ProcessedImage], image_token_id: int,
                        merge_size: int) -> list[int]:
    """Replace the i-th single `image_token_id` by as many as image i has tokens (what the HF processor
    does to the text before tokenizing)."""
    slots = [i for i, t in enumerate(token_ids) if t == image_token_id]
    if len(slots) != len(images):
        raise MultiModalError(f"the prompt has {len(slots)} image placeholders for {len(images)} images")
    out: list[int] = []
    prev = 0
    for slot, image in zip(slots, images):
        out += token_ids[prev:slot]
        out += [image_token_id] * image.num_tokens(merge_size)
        prev = slot + 1
    return out + token_ids[prev:]


def _placeholder_runs(token_ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    arr = np.asarray(token_ids, dtype=np.int64) == image_token_id
    if not arr.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], arr.astype(np.int8), [0]))))
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2])]


def build_mm_prompt(token_ids: list[int], images: list[ProcessedImage], image_token_id: int,
                    merge_size: int) -> MultiModalPrompt:
    """Match each run of placeholders to the next image (same token count) and lay out M-RoPE positions."""
    runs = _placeholder_runs(token_ids, image_token_id)
    if len(runs) != len(images):
        raise MultiModalError(f"the prompt has {len(runs)} image placeholder runs for {len(images)} images")
    placed: list[PromptImage] = []
    pieces: list[np.ndarray] = []
    cur = prev_end = 0
    for (start, end), image in zip(runs, images):
        n = image.num_tokens(merge_size)
        if end - start != n:
            raise MultiModalError(f"image {len(placed)} has {n} tokens but the prompt holds {end - start} placeholders")
        text = start - prev_end
        pieces.append(np.broadcast_to(np.arange(cur, cur + text, dtype=np.int64), (3, text)))
        cur += text
        t, h, w = image.grid_thw
        gh, gw = h // merge_size, w // merge_size
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]).astype(np.int64) + cur)
        cur += max(h, w) // merge_size
        placed.append(PromptImage(image, start, n))
        prev_end = end
    tail = len(token_ids) - prev_end
    pieces.append(np.broadcast_to(np.arange(cur, cur + tail, dtype=np.int64), (3, tail)))
    positions = np.ascontiguousarray(np.concatenate(pieces, axis=1))
    delta = int(positions.max()) + 1 - len(token_ids) if positions.size else 0
    return MultiModalPrompt(tuple(placed), positions, delta)


def extend_chain_mm(hashes: list[int], token_ids: list[int], block_size: int, mm: MultiModalPrompt) -> list[int]:
    """prefix_hash.extend_chain, with the content hash of every image whose tokens fall in a block mixed
    into that block's hash (and so, through the chain, into every later one): same text with another image
    never shares KV."""
    parent = hashes[-1] if hashes else ROOT_HASH
    for b in range(len(hashes), len(token_ids) // block_size):
        lo, hi = b * block_size, (b + 1) * block_size
        parent = hash_block(parent, token_ids[lo:hi])
        images = mm.images_in(lo, hi)
        if images:
            h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
            for im in images:
                h.update(im.image.content_hash.encode())
            parent = int.from_bytes(h.digest(), "little")
        hashes.append(parent)
    return hashes


def prepare_images(token_ids: list[int], pil_images: list, vision: VisionConfig,
                   image_cfg: ImageProcessorConfig) -> tuple[list[int], MultiModalPrompt]:
    """A prompt with one image placeholder per image and the PIL images -> (expanded ids, its images)."""
    if (image_cfg.patch_size, image_cfg.temporal_patch_size, image_cfg.merge_size) != (
            vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size):
        raise MultiModalError("preprocessor_config.json and config.json disagree on the patch / merge sizes")
    for im in pil_images:
        if not hasattr(im, "getbands"):
            raise MultiModalError(f"an image must be a PIL image, got {type(im).__name__}")
    images = [process_image(im, image_cfg) for im in pil_images]
    ids = expand_image_tokens(token_ids, images, vision.image_token_id, vision.spatial_merge_size)
    return ids, build_mm_prompt(ids, images, vision.image_token_id, vision.spatial_merge_size)
