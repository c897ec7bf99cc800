"""Where a worker's KV link buffers live. Kept out of worker/config.py so the config stays torch-free
(the router imports it)."""

from __future__ import annotations

import torch


def kv_link_device(kv_transfer_backend: str, engine_device) -> torch.device:
    """The engine's device for NCCL (and auto), the host for gloo."""
    if kv_transfer_backend == "gloo":
        return torch.device("cpu")
    if kv_transfer_backend == "nccl" and torch.device(engine_device).type != "cuda":
        raise ValueError("--kv-transfer-backend nccl needs the model on CUDA")
    return torch.device(engine_device)
