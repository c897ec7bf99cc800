"""Where a worker's KV link buffers live (engine/kv_link.kv_link_device). Kept out of worker/config.py so
the config stays torch-free (the router imports it)."""

from __future__ import annotations

from glmserve.engine.kv_link import kv_link_device

__all__ = ["kv_link_device"]
