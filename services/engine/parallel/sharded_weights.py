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


def _fp8_shard(handle, scale_handle, name: str, sl: Slice) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(FP8 weight slice, its scales) read apart; None for block-wise scales (blocks need not line up
    with the shard's edges)."""
    scale_name = name + "_scale"
    scale_shape = tuple(scale_handle.get_slice(scale_name).get_shape())
    weight_shape = tuple(handle.get_slice(name).get_shape())
    if len(scale_shape) == 2 and scale_shape[1] > 1:
        return None
    weight = read_slice(handle, name, sl)
    per_channel = len(scale_shape) >= 1 and scale_shape[0] == weight_shape[0] and weight_shape[0] > 1
    if per_channel and sl.dim == 0:
        scale = read_slice(scale_handle, scale_name, Slice(scale_name, 0, sl.ranges))
    else:  # per-tensor, or a column split: every output channel keeps its whole scale
        scale = scale_handle.get_tensor(scale_name)
    return weight, scale


def iterate_shard_weights(
    model_dir: str | Path,
    cfg: ModelConfig,
    st: ParallelState,
    dtype: torch.dtype | None = None,
    *,
    show_progress: bool = True,
    skip: Callable[[str], bool] | None = None,
    keep_fp8: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, this rank's part of the tensor) for the checkpoint's tensors this rank holds.
    keep_fp8: FP8 weights stay FP8, each followed by its (sliced) `weight_scale` (the GPU FP8 path)."""
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
                    scale_handle = where[name + "_scale"]
                    parts = _fp8_shard(handle, scale_handle, name, sl)
                    if keep_fp8:
                        if parts is None:
                            raise ValueError(f"{name}: block-wise FP8 scales cannot be kept on tensor-parallel ranks")
                        yield sl.name, parts[0]
                        yield sl.name + "_scale", parts[1]
                        continue
                    if parts is None:  # block-wise: dequantize the whole tensor, then slice it
                        whole = dequantize_fp8(handle.get_tensor(name), scale_handle.get_tensor(name + "_scale"),
                                               dtype or torch.bfloat16)
                        t = slice_tensor(whole, sl)
                    else:
                        t = dequantize_fp8(parts[0], parts[1], dtype or torch.bfloat16)
                else:
                    t = read_slice(handle, name, sl)
                    if dtype is not None and t.is_floating_point() and t.dtype not in _FP8_DTYPES \
                            and not name.endswith("e_score_correction_bias"):
                        t = t.to(dtype)
                yield sl.name, pad(t, sl)
        finally:
            bar.close()
