"""Reading one tensor-parallel rank's shard of a safetensors checkpoint.

Like weights.iterate_weights (one tensor at a time, cast to the model dtype, FP8 dequantized), but each
tensor is read through safetensors' slice API so only this rank's rows or columns leave the file: the
rank's peak and resident memory are its shard, not the checkpoint. FP8 weights with per-channel or
per-tensor scales are sliced with their scales; block-wise scales are read whole, dequantized, then
sliced (their blocks need not line up with the shard's edges).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from glmserve.engine.config import ModelConfig
from glmserve.engine.parallel.parallel_state import ParallelState
from glmserve.engine.parallel.sharding import Slice, checkpoint_slice
from glmserve.engine.weights import _FP8_DTYPES, checkpoint_files, dequantize_fp8


def _index(sl: Slice, ndim: int, start: int, length: int) -> tuple[slice, ...]:
    return tuple(slice(start, start + length) if d == sl.dim else slice(None) for d in range(ndim))


def read_slice(handle, name: str, sl: Slice) -> torch.Tensor:
    """Rows `sl.ranges` of dim `sl.dim` of tensor `name`, read from the file without the rest."""
    if sl.dim is None:
        return handle.get_tensor(name)
    part = handle.get_slice(name)
    ndim = len(part.get_shape())
    pieces = [part[_index(sl, ndim, start, n)] for start, n in sl.ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=sl.dim)


def slice_tensor(t: torch.Tensor, sl: Slice) -> torch.Tensor:
    """The same selection applied to a tensor already in memory."""
    if sl.dim is None:
        return t
    return torch.cat([t.narrow(sl.dim, start, n) for start, n in sl.ranges], dim=sl.dim)


def pad(t: torch.Tensor, sl: Slice) -> torch.Tensor:
    if sl.pad_to is None or t.shape[sl.dim] == sl.pad_to:
        return t
    shape = list(t.shape)
    shape[sl.dim] = sl.pad_to - t.shape[sl.dim]
    return torch.cat([t, t.new_zeros(shape)], dim=sl.dim)


def _fp8_shard(handle, scale_handle, name: str, sl: Slice, dtype: torch.dtype) -> torch.Tensor:
    scale_name = name + "_scale"
    scale_shape = tuple(scale_handle.get_slice(scale_name).get_shape())
    weight_shape = tuple(handle.get_slice(name).get_shape())
    blockwise = len(scale_shape) == 2 and scale_shape[1] > 1
    if blockwise or sl.dim is None:
        whole = dequantize_fp8(handle.get_tensor(name), scale_handle.get_tensor(scale_name), dtype)
        return slice_tensor(whole, sl)
    weight = read_slice(handle, name, sl)
    per_channel = len(scale_shape) >= 1 and scale_shape[0] == weight_shape[0] and weight_shape[0] > 1
    if per_channel and sl.dim == 0:
        scale = read_slice(scale_handle, scale_name, Slice(scale_name, 0, sl.ranges))
    else:  # per-tensor, or a column split: every output channel keeps its whole scale
        scale = scale_handle.get_tensor(scale_name)
    return dequantize_fp8(weight, scale, dtype)


def iterate_shard_weights(
    model_dir: str | Path,
    cfg: ModelConfig,
    st: ParallelState,
    dtype: torch.dtype | None = None,
    *,
    show_progress: bool = True,
    skip: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, this rank's part of the tensor) for the checkpoint's tensors this rank holds."""
    from safetensors import safe_open

    files = checkpoint_files(model_dir)
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
        where = {k: h for h in handles for k in h.keys()}
        names = [k for k in where if not k.endswith(".weight_scale") and not (skip and skip(k))]
        bar = tqdm(total=len(names), desc=f"Loading weights (rank {st.rank})", unit="tensor",
                   disable=not show_progress)
        try:
            for name in names:
                bar.update(1)
                handle = where[name]
                sl = checkpoint_slice(name, tuple(handle.get_slice(name).get_shape()), cfg, st)
                if sl is None:
                    continue
                if handle.get_slice(name).get_dtype() in ("F8_E4M3", "F8_E5M2"):
                    if name + "_scale" not in where:
                        raise ValueError(f"FP8 tensor {name} has no {name}_scale in the checkpoint")
                    t = _fp8_shard(handle, where[name + "_scale"], name, sl, dtype or torch.bfloat16)
                else:
                    t = read_slice(handle, name, sl)
                    if dtype is not None and t.is_floating_point() and t.dtype not in _FP8_DTYPES \
                            and not name.endswith("e_score_correction_bias"):
                        t = t.to(dtype)
                yield sl.name, pad(t, sl)
        finally:
            bar.close()
