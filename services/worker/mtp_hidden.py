"""The prompt's last hidden state on the wire (PrefillResponse.mtp_hidden): raw bytes in the model dtype."""

from __future__ import annotations

import torch


def hidden_to_bytes(hidden: torch.Tensor) -> bytes:
    return hidden.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()


def hidden_from_bytes(data: bytes, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Raises ValueError when the size does not match (a prefill worker with another model)."""
    want = hidden_size * torch.empty((), dtype=dtype).element_size()
    if len(data) != want:
        raise ValueError(f"MTP hidden state of {len(data)} bytes, expected {want} ({hidden_size} x {dtype})")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).clone()
