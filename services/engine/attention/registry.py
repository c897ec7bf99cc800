"""Attention backends by name. GPU backends register here without the models changing."""

from __future__ import annotations

from typing import Callable

import torch

from glmserve.engine.attention.backend import AttentionBackend

_FACTORIES: dict[str, Callable[[], AttentionBackend]] = {}


def register(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _FACTORIES[name] = factory


def _torch() -> AttentionBackend:
    from glmserve.engine.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


register("torch", _torch)


def available() -> list[str]:
    return sorted(_FACTORIES)


def create(name: str, device: torch.device) -> AttentionBackend:
    """`auto` picks the fastest backend that can run on `device`; unknown names fail clearly."""
    if name == "auto":
        name = "torch"
    if name not in _FACTORIES:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(available())}")
    return _FACTORIES[name]()
