"""Images between the router and the workers (ImageInput messages) and the engine's MultiModalPrompt.

The router sends the patches it computed; each worker rebuilds the prompt's image layout from the token
ids (engine/mm_inputs.py), so all three agree on where every image sits and on the M-RoPE positions.
Torch-free: the router uses it too.
"""

from __future__ import annotations

import numpy as np

from glmserve.engine.image_processor import ProcessedImage
from glmserve.engine.mm_inputs import MultiModalPrompt, build_mm_prompt
from glmserve.engine.vision_config import VisionConfig
from glmserve.protos import worker_pb2 as pb


def images_to_pb(mm: MultiModalPrompt | None) -> list[pb.ImageInput]:
    if mm is None:
        return []
    out = []
    for placed in mm.images:
        im = placed.image
        t, h, w = im.grid_thw
        out.append(pb.ImageInput(patches=np.ascontiguousarray(im.patches, dtype="<f4").tobytes(),
                                 grid_t=t, grid_h=h, grid_w=w, content_hash=im.content_hash))
    return out


def mm_from_pb(prompt: list[int], images, vision: VisionConfig | None) -> MultiModalPrompt | None:
    """The prompt's image layout from the request's ImageInputs; ValueError when they do not fit."""
    if not images:
        return None
    if vision is None:
        raise ValueError("this model takes no images")
    decoded = []
    for i, msg in enumerate(images):
        n = msg.grid_t * msg.grid_h * msg.grid_w
        m = vision.spatial_merge_size
        if n == 0 or msg.grid_h % m or msg.grid_w % m:
            raise ValueError(f"image {i}: grid {msg.grid_t}x{msg.grid_h}x{msg.grid_w} is not a grid of "
                             f"{m}x{m} patch blocks")
        if len(msg.patches) != n * vision.patch_dim * 4:
            raise ValueError(f"image {i}: {len(msg.patches)} bytes of patches for a {msg.grid_t}x{msg.grid_h}x"
                             f"{msg.grid_w} grid of {vision.patch_dim} float32 values each")
        if not msg.content_hash:
            raise ValueError(f"image {i}: content_hash is empty")
        patches = np.frombuffer(msg.patches, dtype="<f4").reshape(n, vision.patch_dim)
        decoded.append(ProcessedImage(patches, (msg.grid_t, msg.grid_h, msg.grid_w), msg.content_hash))
    return build_mm_prompt(prompt, decoded, vision.image_token_id, vision.spatial_merge_size)
