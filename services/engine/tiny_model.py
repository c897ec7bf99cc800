"""Complete tiny HF-format model directories (tokenizer + random weights) for tests, demos and the default model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from glmserve.engine.tiny_tokenizer import write_tiny_tokenizer

# Bump when the tiny assets or checkpoint layout change, so stale cached builds are not reused.
TINY_MODEL_VERSION = 1


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0, **options: Any) -> Path:
    """Write tokenizer files and a random `arch` checkpoint whose ids agree with them; options go to
    write_tiny_checkpoint (and may override the vocab/eos/pad/bos defaults taken from the tokenizer)."""
    # Imported here: the checkpoint writer pulls in torch, which tokenizer-only users should not pay for.
    from glmserve.engine.tiny_checkpoint import write_tiny_checkpoint

    out_dir = Path(out_dir)
    info = write_tiny_tokenizer(out_dir)
    kwargs: dict[str, Any] = dict(vocab_size=info.vocab_size, eos_token_ids=info.eos_token_ids,
                                  bos_token_id=info.bos_token_id, pad_token_id=info.pad_token_id)
    kwargs.update(options)
    write_tiny_checkpoint(arch, out_dir, seed=seed, **kwargs)
    return out_dir


def default_tiny_model_dir(cache_dir: Path, arch: str = "glm4_moe") -> Path:
    """The built-in model: built once under cache_dir, then reused.

    Built in a private temp dir and renamed into place, so a reader never sees a half-written model and
    two processes racing both end up using one complete directory.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / f"tiny-{arch}-v{TINY_MODEL_VERSION}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{target.name}-", dir=cache_dir))
    try:
        build_tiny_model(arch, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not the "someone else finished first" case
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
