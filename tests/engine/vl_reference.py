"""Helpers for the glm4v_moe tests: a tiny VL model directory, random images, prompts with image
placeholders, transformers' logits for them, and a driver of OUR ModelRunner over hand-made schedules
(so the real step path runs: step inputs, M-RoPE positions, encoder cache, paged attention).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from glmserve.engine.config import CacheConfig
from glmserve.engine.image_processor import ProcessedImage, process_image
from glmserve.engine.mm_inputs import MultiModalPrompt, build_mm_prompt, expand_image_tokens
from glmserve.engine.model_runner import ModelRunner
from glmserve.engine.request import Request
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.scheduler import ScheduledChunk
from glmserve.engine.vision_config import ImageProcessorConfig

# Special ids of the tiny tokenizer (the tiny VL config agrees: tiny_vl_checkpoint._TOKEN_IDS).
IMAGE, BOI, EOI = 998, 977, 978
GMASK, SOP, USER, ASSISTANT = 969, 971, 974, 975


def make_vl_model(directory: Path, seed: int = 0) -> Path:
    from glmserve.engine.tiny_model import build_tiny_model

    return build_tiny_model("glm4v_moe", Path(directory), seed=seed)


def random_image(height: int, width: int, seed: int, mode: str = "RGB"):
    """Smooth-ish random picture (noise plus gradients), so resizing does real work."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), (xx + yy) % 256], -1)
    noisy = np.clip(base + rng.integers(-60, 60, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(noisy, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def prompt_ids(parts: Sequence, images: list[ProcessedImage], merge: int = 2) -> list[int]:
    """Token ids: [gMASK]<sop><|user|>, then for each part either a list of text ids or None (the next
    image, bracketed as the chat template writes it), then <|assistant|>; placeholders expanded."""
    ids = [GMASK, SOP, USER]
    for part in parts:
        ids += [BOI, IMAGE, EOI] if part is None else list(part)
    ids.append(ASSISTANT)
    return expand_image_tokens(ids, images, IMAGE, merge)


def text_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 960) for _ in range(n)]


def processed(images, model_dir: Path) -> list[ProcessedImage]:
    cfg = ImageProcessorConfig.from_dir(model_dir)
    return [process_image(im, cfg) for im in images]


def load_hf_vl(model_dir: Path):
    from transformers import Glm4vMoeForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return Glm4vMoeForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()


def hf_inputs(model_dir: Path, ids: list[int], pil_images) -> dict:
    """transformers' model inputs: ITS image processor's pixels, the ids, the image-token mask."""
    from transformers import AutoImageProcessor

    inputs = {"input_ids": torch.tensor([ids]), "mm_token_type_ids": (torch.tensor([ids]) == IMAGE).int()}
    if pil_images:
        px = AutoImageProcessor.from_pretrained(str(model_dir))(images=pil_images, return_tensors="pt")
        inputs.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
    return inputs


@torch.no_grad()
def hf_vl_logits(hf, model_dir: Path, ids: list[int], pil_images) -> torch.Tensor:
    return hf(**hf_inputs(model_dir, ids, pil_images)).logits[0].float()


class VLRunner:
    """Our ModelRunner driven by explicit schedules: `step([(request, n), ...])` runs the next n tokens of
    each request in ONE forward pass (blocks from a shuffled pool) and records every row's logits."""

    def __init__(self, loaded, block_size: int = 4, num_blocks: int = 96, seed: int = 0):
        self.model, self.cfg = loaded.model, loaded.config
        self.runner = ModelRunner(loaded.model, loaded.config, loaded.model.backend,
                                  CacheConfig(block_size=block_size, num_blocks=num_blocks), torch.float32,
                                  torch.device("cpu"))
        self.block_size = block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.logits: dict[str, list[torch.Tensor]] = {}

    def add(self, rid: str, ids: list[int], images: list[ProcessedImage]) -> Request:
        mm = build_mm_prompt(ids, images, IMAGE, 2) if images else None
        self.logits[rid] = []
        return Request(rid, list(ids), SamplingParams(max_tokens=64), mm=mm)

    @torch.no_grad()
    def step(self, work: Sequence[tuple[Request, int]]) -> None:
        chunks = []
        for req, n in work:
            need = -(-(req.num_computed_tokens + n) // self.block_size)
            while len(req.block_ids) < need:
                req.block_ids.append(self.free.pop())
            chunks.append(ScheduledChunk(req, n))
        result = self.runner.execute(chunks, keep_hidden=True)
        logits = self.model.compute_logits(result.hidden).float()
        row = 0
        for req, n in work:
            self.logits[req.request_id].append(logits[row : row + n])
            req.num_computed_tokens += n
            row += n

    def sequence_logits(self, rid: str) -> torch.Tensor:
        return torch.cat(self.logits[rid])


def mm_of(req: Request) -> MultiModalPrompt:
    assert req.mm is not None
    return req.mm
