"""dtype and device names -> torch objects."""

from __future__ import annotations

import torch

from glmserve.engine.config import ModelConfig

_BY_NAME = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _BY_NAME[name.lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; use auto, bfloat16, float16 or float32") from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' = cuda when available, else cpu."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto' = the checkpoint's dtype; an FP8 checkpoint on CPU runs in float32 (dequantized there, and CPU
    half-precision matmuls are slow); an FP8 checkpoint elsewhere runs in bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return parse_dtype(dtype)
    if cfg.quant is not None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return parse_dtype(cfg.checkpoint_dtype)
    except ValueError:  # e.g. a checkpoint stored in fp8 without a quantization_config
        return torch.float32 if device.type == "cpu" else torch.bfloat16
