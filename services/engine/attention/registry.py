"""Attention backends by name. GPU backends register here without the models changing.

Names: torch (reference, runs anywhere), triton (our kernels, any CUDA GPU), flashinfer (FlashInfer
wrappers), fa3 (FlashAttention-3 prefill on Hopper). Each GPU backend registers a capability check that
runs before its module is imported, so `create` fails with a ValueError naming what is missing (no
CUDA device, not Hopper, library not installed) and never half-imports a GPU library on CPU.

`auto`: torch on CPU; on CUDA, fa3 on Hopper when FA3 or FlashInfer is installed, else flashinfer
when installed, else triton.
"""

from __future__ import annotations

from typing import Callable

import torch

from glmserve.engine.attention import capability
from glmserve.engine.attention.backend import AttentionBackend

_FACTORIES: dict[str, Callable[[], AttentionBackend]] = {}
_CHECKS: dict[str, Callable[[torch.device], None]] = {}


def register(name: str, factory: Callable[[], AttentionBackend],
             check: Callable[[torch.device], None] | None = None) -> None:
    """`check(device)` raises capability.BackendUnavailable when the backend cannot run there."""
    _FACTORIES[name] = factory
    if check is not None:
        _CHECKS[name] = check
    else:
        _CHECKS.pop(name, None)


def _torch() -> AttentionBackend:
    from glmserve.engine.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


def _triton() -> AttentionBackend:
    from glmserve.engine.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend()


def _flashinfer() -> AttentionBackend:
    from glmserve.engine.attention.flashinfer_backend import FlashInferAttentionBackend

    return FlashInferAttentionBackend()


def _fa3() -> AttentionBackend:
    from glmserve.engine.attention.fa3_backend import create_fa3_backend

    return create_fa3_backend()


register("torch", _torch)
register("triton", _triton, capability.check_triton)
register("flashinfer", _flashinfer, capability.check_flashinfer)
register("fa3", _fa3, capability.check_fa3)

# Fastest first; `auto` takes the first whose check passes on the device.
AUTO_ORDER_CUDA = ("fa3", "flashinfer", "triton")


def available() -> list[str]:
    return sorted(_FACTORIES)


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on `device`, or None when it can."""
    check = _CHECKS.get(name)
    if check is None:
        return None
    try:
        check(torch.device(device))
    except capability.BackendUnavailable as e:
        return str(e)
    return None


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend name `create(name, device)` would build (resolves `auto`)."""
    device = torch.device(device)
    if name != "auto":
        return name
    if device.type != "cuda":
        return "torch"
    for candidate in AUTO_ORDER_CUDA:
        if candidate in _FACTORIES and unavailable_reason(candidate, device) is None:
            return candidate
    return "torch"


def create(name: str, device: torch.device) -> AttentionBackend:
    """`auto` picks the fastest backend that can run on `device`; unknown names and backends that cannot
    run on the device fail with a ValueError saying why."""
    resolved = resolve(name, device)
    if resolved not in _FACTORIES:
        raise ValueError(f"unknown attention backend {resolved!r}; available: {', '.join(available())}")
    reason = unavailable_reason(resolved, device)
    if reason is not None:
        raise ValueError(f"attention backend {resolved!r} cannot run on device {str(torch.device(device))!r}: {reason}")
    try:
        return _FACTORIES[resolved]()
    except capability.BackendUnavailable as e:  # e.g. the library is present but fails to import
        raise ValueError(f"attention backend {resolved!r} cannot run on device {str(torch.device(device))!r}: {e}") from e


# Decode: graph-capturable first (CUDA graphs matter most for small decode batches).
DECODE_AUTO_ORDER_CUDA = ("triton", "flashinfer")


def resolve_decode(name: str, device: torch.device) -> str:
    device = torch.device(device)
    if name != "auto" or device.type != "cuda":
        return resolve(name, device)
    for candidate in DECODE_AUTO_ORDER_CUDA:
        if candidate in _FACTORIES and unavailable_reason(candidate, device) is None:
            return candidate
    return "torch"


def create_for_roles(prefill: str, decode: str, device: torch.device) -> AttentionBackend:
    """The engine's backend: one instance when both roles resolve to the same backend, else a split."""
    from glmserve.engine.attention.split_backend import SplitAttentionBackend

    if decode == "fa3":
        raise ValueError("fa3 is a prefill backend; decode backends: flashinfer, triton, torch")
    p, d = resolve(prefill, device), resolve_decode(decode, device)
    if p == d:
        return create(p, device)
    return SplitAttentionBackend(create(p, device), create(d, device))
