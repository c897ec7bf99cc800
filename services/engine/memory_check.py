"""Refuse, before allocating anything, a model whose weights cannot fit the device: a preset such as
GLM-4.7 on a laptop would otherwise grow the process until the kernel kills it (or the machine swaps)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays out of the CLI's imports (the operator image has none)
    import torch


class ModelTooLarge(ValueError):
    pass


def available_bytes(device: "torch.device") -> tuple[int, str] | None:
    """(bytes free for weights, what they are) or None when unknown."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"GPU memory free on {device}"
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "CPU memory available"
    return None


def check_fits(name: str, is_preset: bool, num_params: int, bytes_per_param: float, dtype: "torch.dtype",
               device: "torch.device") -> None:
    have = available_bytes(device)
    need = num_params * bytes_per_param
    if have is None or need <= have[0]:
        return
    gb = 1e9
    fix = ("pick a preset that fits (GLM-4.7-Flash is the smallest) or a GPU that holds it; "
           "--load-format dummy (random weights) still needs the full size" if is_preset
           else "use a device with more memory or a smaller --dtype")
    raise ModelTooLarge(f"{name} needs {need / gb:.0f} GB for its {num_params / 1e9:.1f}B parameters in "
                        f"{str(dtype).removeprefix('torch.')}, but this machine has {have[0] / gb:.0f} GB of "
                        f"{have[1]}: {fix}")
