"""What a device and the installed libraries can run, checked without importing the heavy libraries.

Each `check_*` raises `BackendUnavailable` naming the missing requirement (no CUDA device, not Hopper,
library not installed); the registry turns that into the ValueError its callers see. Nothing here
touches CUDA on a machine without it, so importing this module is always cheap and safe.
"""

from __future__ import annotations

import importlib.util

import torch


class BackendUnavailable(ValueError):
    """An attention backend cannot run on the given device (the message says why)."""


def module_installed(name: str) -> bool:
    """True when `import name` would find the module (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def flashinfer_installed() -> bool:
    return module_installed("flashinfer")


def fa3_installed() -> bool:
    """The FlashAttention-3 library (built from flash-attention/hopper) installs `flash_attn_interface`."""
    return module_installed("flash_attn_interface")


def triton_installed() -> bool:
    return module_installed("triton")


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, or None for any other device or when CUDA is absent."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)


def _require_cuda(device: torch.device, what: str) -> tuple[int, int]:
    device = torch.device(device)
    if device.type != "cuda":
        raise BackendUnavailable(f"{what} needs a CUDA device, got {device.type!r}")
    cap = cuda_capability(device)
    if cap is None:
        raise BackendUnavailable(f"{what} needs a CUDA device, but torch reports no CUDA available")
    return cap


def check_triton(device: torch.device) -> None:
    """Triton kernels compile for CUDA GPUs (on CPU they run only under TRITON_INTERPRET=1, for tests)."""
    _require_cuda(device, "the triton attention backend")
    if not triton_installed():
        raise BackendUnavailable("the triton attention backend needs the `triton` package (not installed)")


def check_flashinfer(device: torch.device) -> None:
    cap = _require_cuda(device, "the flashinfer attention backend")
    if cap < (8, 0):
        raise BackendUnavailable(f"the flashinfer attention backend needs compute capability >= 8.0, got {cap}")
    if not flashinfer_installed():
        raise BackendUnavailable(
            "the flashinfer attention backend needs the `flashinfer-python` package (not installed; "
            "install the `gpu` extra)")


def check_fa3(device: torch.device) -> None:
    """FA3 runs on Hopper only; it comes from the FA3 library or from FlashInfer's backend='fa3'."""
    cap = _require_cuda(device, "the fa3 attention backend")
    if cap[0] != 9:
        raise BackendUnavailable(f"the fa3 attention backend needs a Hopper GPU (sm90), got sm{cap[0]}{cap[1]}")
    if not (fa3_installed() or flashinfer_installed()):
        raise BackendUnavailable(
            "the fa3 attention backend needs the FlashAttention-3 library (`flash_attn_interface`) or "
            "`flashinfer-python` (neither is installed)")
