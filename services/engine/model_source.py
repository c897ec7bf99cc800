"""Which model directory a `--model` argument names. Torch-free: the router resolves its model too."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "glmserve"


def resolve_model(model: str | None, cache_dir: Path = DEFAULT_CACHE_DIR) -> str:
    """None means the built-in tiny model, built on first use (building it is the only step needing torch)."""
    if model:
        return model
    from glmserve.engine.tiny_model import default_tiny_model_dir

    return str(default_tiny_model_dir(cache_dir))
