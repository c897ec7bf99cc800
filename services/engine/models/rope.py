"""Rotary position embeddings with a cached cos/sin table.

Two layouts, both rotating only the FIRST `rotary_dim` dims of each head (the rest passes through):
- NeoX (glm4_moe): pairs are (i, i + d/2) — rotate_half over the rotated slice.
- Interleaved (MLA, glm4_moe_lite with rope_interleave): pairs are (2i, 2i+1). The output is written
  de-interleaved (evens' results, then odds'), exactly as transformers does; q and k get the same
  permutation so their dot products are unchanged, and the cache simply holds the permuted layout.

The angles are computed as transformers computes them (fp32 `position * inv_freq`), so tables match
bit for bit; cos/sin are cast to the activation dtype before use, as transformers does.
"""

from __future__ import annotations

import torch
from torch import nn


def inv_frequencies(rotary_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    return 1.0 / (theta**exponents)


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] with cos/sin [..., d/2] broadcastable; rotates x[..., :d] NeoX style."""
    d = cos.shape[-1] * 2
    rot, rest = x[..., :d], x[..., d:]
    x1, x2 = rot[..., : d // 2], rot[..., d // 2 :]
    cos_full = torch.cat((cos, cos), dim=-1)
    sin_full = torch.cat((sin, sin), dim=-1)
    rotated = rot * cos_full + torch.cat((-x2, x1), dim=-1) * sin_full
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] with cos/sin [..., d/2]; rotates pairs (2i, 2i+1) of x[..., :d], output de-interleaved."""
    d = cos.shape[-1] * 2
    rot, rest = x[..., :d], x[..., d:]
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


class RotaryEmbedding(nn.Module):
    """Applies RoPE at given positions; the cos/sin table grows on demand (no max-length table up front)."""

    def __init__(
        self,
        rotary_dim: int,
        theta: float,
        interleaved: bool = False,
        scaling: dict | None = None,
        initial_positions: int = 4096,
    ):
        super().__init__()
        if scaling and scaling.get("rope_type", "default") not in ("default", None):
            raise NotImplementedError(f"RoPE scaling {scaling.get('rope_type')!r} is not supported")
        if rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        # Plain tensors, not buffers: the tables are derived state, rebuilt lazily on the positions' device
        # (so a model materialised with to_empty() or moved between devices never sees stale values).
        self.theta = theta
        self.cos_cache = torch.empty(0, rotary_dim // 2, device="cpu")
        self.sin_cache = torch.empty(0, rotary_dim // 2, device="cpu")
        self._initial = initial_positions

    def _ensure(self, max_position: int, device: torch.device) -> None:
        n = self.cos_cache.shape[0]
        if max_position < n and self.cos_cache.device == device:
            return
        size = max(self._initial, n * 2, max_position + 1)
        pos = torch.arange(size, device=device, dtype=torch.int64).float()
        freqs = pos[:, None] * inv_frequencies(self.rotary_dim, self.theta, device)[None, :]
        self.cos_cache = freqs.cos()
        self.sin_cache = freqs.sin()

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, max_position: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rotary_dim/2] in `dtype` for int positions [T].

        Pass `max_position` when known on the host (e.g. max(ctx.seq_lens_cpu) - 1) to avoid a device sync.
        Models call this once per step and hand cos/sin to every layer's `rotate`.
        """
        if max_position is None:
            max_position = int(positions.max()) if positions.numel() else 0
        self._ensure(max_position, positions.device)
        return self.cos_cache[positions].to(dtype), self.sin_cache[positions].to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, H, D] or [T, D] with cos/sin [T, rotary_dim/2] from `cos_sin`."""
        if x.dim() == 3:
            cos, sin = cos[:, None, :], sin[:, None, :]
        fn = rotate_interleaved if self.interleaved else rotate_neox
        return fn(x, cos.to(x.dtype), sin.to(x.dtype))

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate each x [T, H, D] (or [T, D]) at positions [T]."""
        cos, sin = self.cos_sin(positions, xs[0].dtype)
        return tuple(self.rotate(x, cos, sin) for x in xs)
