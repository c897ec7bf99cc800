"""M-RoPE (multimodal rotary embedding) of the GLM-4.xV text model.

Every token has three positions (t, h, w): text tokens have t = h = w, an image's tokens share t and count
rows and columns of its merged patch grid. The rotary frequencies are split into sections (`mrope_section`,
e.g. [8, 12, 12]): the first section rotates by the t position, the next by h, the last by w; the pattern
repeats if the sections are shorter than the frequencies (transformers' `i % 3`). Within each head the
rotation is the NeoX one over the first rotary_dim dims, exactly as for glm4_moe, so the same rotate applies.
"""

from __future__ import annotations

import torch

from glmserve.engine.models.rope import RotaryEmbedding


class MRotaryEmbedding(RotaryEmbedding):
    def __init__(self, rotary_dim: int, theta: float, mrope_section: tuple[int, ...], scaling: dict | None = None):
        super().__init__(rotary_dim, theta, interleaved=False, scaling=scaling)
        if sum(mrope_section) != rotary_dim // 2:
            raise ValueError(f"mrope_section {list(mrope_section)} must add up to rotary_dim/2 = {rotary_dim // 2}")
        # Which of the 3 position rows each frequency reads (a list: models are built on the meta device).
        self.axis_of_freq = [i % 3 for i, n in enumerate(mrope_section) for _ in range(n)]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, max_position: int | None = None):
        """positions [3, T] (t, h, w) or [T] (text only: the same position on all three axes)."""
        if positions.dim() == 1:
            return super().cos_sin(positions, dtype, max_position)
        if max_position is None:
            max_position = int(positions.max()) if positions.numel() else 0
        self._ensure(max_position, positions.device)
        axis = torch.tensor(self.axis_of_freq, dtype=torch.int64, device=positions.device)
        # Row j of the table at the position of axis axis[j]: gather per frequency column.
        cols = torch.arange(axis.numel(), device=positions.device)
        pos = positions[axis]  # [F, T]: the position each frequency uses, per token
        cos = self.cos_cache[pos, cols[:, None]].transpose(0, 1)
        sin = self.sin_cache[pos, cols[:, None]].transpose(0, 1)
        return cos.to(dtype), sin.to(dtype)
