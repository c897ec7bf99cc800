"""The multimodal part of a step's model inputs: M-RoPE positions of every new token, and the vision
encoder rows that replace the embeddings of the image tokens among them.

A chunk may hold part of an image (chunked prefill): the image is encoded once, kept in the encoder cache,
and each chunk takes the rows of its own tokens. Images missing from the cache are encoded together in
one call of the tower per step.
"""

from __future__ import annotations

import numpy as np
import torch

from glmserve.engine.encoder_cache import EncoderCache


def stack_patches(images) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The encoder's input for several ProcessedImages: concatenated patches and their grids."""
    return (torch.from_numpy(np.concatenate([im.patches for im in images])),
            [tuple(im.grid_thw) for im in images])


class MultiModalStepBuilder:
    def __init__(self, model: torch.nn.Module, cache: EncoderCache):
        self.model = model
        self.cache = cache
        self.num_images_encoded = 0

    def _embeddings(self, images) -> dict[str, torch.Tensor]:
        """content hash -> encoder output, for every image in `images` (encoding those not cached)."""
        found: dict[str, torch.Tensor] = {}
        missing = []
        for im in images:
            h = im.image.content_hash
            if h in found or any(m.content_hash == h for m in missing):
                continue
            emb = self.cache.get(h)
            if emb is None:
                missing.append(im.image)
            else:
                found[h] = emb
        if missing:
            patches, grids = stack_patches(missing)
            out = self.model.encode_images(patches, grids)
            merge = self.model.cfg.vision.spatial_merge_size
            for image, emb in zip(missing, out.split([m.num_tokens(merge) for m in missing])):
                found[image.content_hash] = emb
                self.cache.put(image.content_hash, emb)
            self.num_images_encoded += len(missing)
        return found

    def build(self, chunks, positions: torch.Tensor):
        """(positions [3, T] or the given [T] when no chunk has images, image_embeds [R, H] or None,
        image_rows [R] or None) for a step over `chunks`."""
        if not any(c.request.mm is not None for c in chunks):
            return positions, None, None
        parts: list[np.ndarray] = []
        wanted = []  # (row in the step, image, first and last token of it in this chunk)
        row = 0
        for c in chunks:
            req, n = c.request, c.num_new_tokens
            start = req.num_computed_tokens
            mm = req.mm
            if mm is None:
                parts.append(np.broadcast_to(np.arange(start, start + n, dtype=np.int64), (3, n)))
            else:
                parts.append(mm.positions_of(start, n))
                for im in mm.images_in(start, start + n):
                    lo, hi = max(start, im.offset), min(start + n, im.end)
                    wanted.append((row + lo - start, im, lo - im.offset, hi - im.offset))
            row += n
        dev = positions.device
        pos3 = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, axis=1))).to(dev)
        if not wanted:
            return pos3, None, None
        embs = self._embeddings([w[1] for w in wanted])
        rows = torch.cat([torch.arange(r, r + hi - lo) for r, _, lo, hi in wanted]).to(dev)
        image_embeds = torch.cat([embs[im.image.content_hash][lo:hi] for _, im, lo, hi in wanted])
        return pos3, image_embeds, rows
