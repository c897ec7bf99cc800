"""The GLM-4.xV vision tower: flattened patches of one or more images -> one embedding per merged patch.

patches [N, C*tp*p*p] (the preprocessor's layout: each image's patches block-major over merge x merge
blocks) -> patch embedding (the checkpoint's 3-D conv, whose kernel covers exactly one patch, so a matmul)
-> RMSNorm -> + learned absolute position table resampled (bicubic) to the image's patch grid -> blocks of
bidirectional attention within each image (2-D RoPE over the patch row and column) and a SwiGLU MLP ->
RMSNorm -> merge x merge patches downsampled by a strided conv -> the merger MLP into the text model's width.
Module names mirror the checkpoint's `model.visual.*` so weights load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmserve.engine.models.layers import Linear, RMSNorm
from glmserve.engine.models.rope import inv_frequencies, rotate_neox
from glmserve.engine.vision_config import VisionConfig


def patch_positions(grid_thw: list[tuple[int, int, int]], merge: int, device: torch.device) -> torch.Tensor:
    """(row, col) of every patch [N, 2], in the block-major order the patches come in."""
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        block = (h // merge, merge, w // merge, merge)
        rc = torch.stack([rows.reshape(block).transpose(1, 2).flatten(), cols.reshape(block).transpose(1, 2).flatten()], -1)
        out.append(rc.repeat(t, 1))
    return torch.cat(out)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        p, tp = cfg.patch_size, cfg.temporal_patch_size
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, tp, p, p), requires_grad=False)
        self.proj.bias = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(patches.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class PositionTable(nn.Module):
    """The learned square table of absolute position embeddings, resampled to each image's patch grid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        side = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Embedding(side * side, cfg.hidden_size)
        self.position_embedding.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor, rc: torch.Tensor, grid_h: torch.Tensor, grid_w: torch.Tensor) -> torch.Tensor:
        """x [N, D]; rc [N, 2] patch (row, col); grid_h/grid_w [N]: the patch grid of each patch's image."""
        table = self.position_embedding.weight
        side = int(table.shape[0] ** 0.5)
        grid_img = table.view(side, side, -1).permute(2, 0, 1)[None].float()  # [1, D, side, side]
        # Patch centres in [-1, 1] of the table's extent (align_corners=False convention).
        ys = (rc[:, 0].float() + 0.5) / grid_h * 2 - 1
        xs = (rc[:, 1].float() + 0.5) / grid_w * 2 - 1
        coords = torch.stack((xs, ys), -1)[None, :, None, :]  # [1, N, 1, 2]
        sampled = F.grid_sample(grid_img, coords, mode="bicubic", align_corners=False, padding_mode="border")
        return x + sampled[0, :, :, 0].transpose(0, 1).to(table.dtype).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # The rotation is computed in fp32 and cast back, as transformers does.
        q = rotate_neox(q.float(), cos, sin).to(x.dtype)
        k = rotate_neox(k.float(), cos, sin).to(x.dtype)
        outs = []
        for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths)):  # each image on its own
            o = F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1))
            outs.append(o.transpose(0, 1))
        return self.proj(torch.cat(outs).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.gate_proj = Linear(dim, inner)
        self.up_proj = Linear(dim, inner)
        self.down_proj = Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        # The blocks' MLP width is out_hidden_size (the checkpoint's shape; intermediate_size is the merger's).
        self.mlp = VisionMLP(cfg.hidden_size, cfg.out_hidden_size)

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, dim)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.post_projection_norm.requires_grad_(False)
        self.gate_proj = Linear(dim, inner)
        self.up_proj = Linear(dim, inner)
        self.down_proj = Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Glm4vVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.post_conv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embeddings = PositionTable(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        m = cfg.spatial_merge_size
        self.downsample = nn.Conv2d(cfg.hidden_size, cfg.out_hidden_size, kernel_size=m, stride=m)
        self.downsample.requires_grad_(False)
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.intermediate_size)

    def rope(self, rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D RoPE over the whole head: the first half of the frequencies by row, the second by column."""
        inv = inv_frequencies(self.cfg.head_dim // 2, self.cfg.rope_theta, rc.device)
        freqs = torch.cat([rc[:, 0, None].float() * inv, rc[:, 1, None].float() * inv], dim=-1)
        return freqs.cos()[:, None, :], freqs.sin()[:, None, :]

    def forward(self, patches: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """patches [N, patch_dim] of the images of `grid_thw` (t, h, w in patches) -> [N / merge^2, out_hidden]."""
        m = self.cfg.spatial_merge_size
        dev = patches.device
        rc = patch_positions(grid_thw, m, dev)
        lengths = [h * w for t, h, w in grid_thw for _ in range(t)]  # attention never crosses frames
        sizes = [t * h * w for t, h, w in grid_thw]
        grid_h = torch.repeat_interleave(torch.tensor([h for _, h, _ in grid_thw], device=dev).float(),
                                         torch.tensor(sizes, device=dev))
        grid_w = torch.repeat_interleave(torch.tensor([w for _, _, w in grid_thw], device=dev).float(),
                                         torch.tensor(sizes, device=dev))
        x = self.post_conv_layernorm(self.patch_embed(patches))
        cos, sin = self.rope(rc)
        x = self.embeddings(x, rc, grid_h, grid_w)
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        x = self.post_layernorm(x)
        x = x.view(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2)
        x = self.downsample(x).view(-1, self.cfg.out_hidden_size)
        return self.merger(x)
