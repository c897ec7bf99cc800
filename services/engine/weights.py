"""Reading checkpoint tensors: safetensors (single or sharded), FP8 compressed-tensors, dummy weights.

`iterate_weights` yields (checkpoint name, tensor) one at a time, so the peak host memory is one tensor,
not the checkpoint. FP8 weights (float8_e4m3fn `X.weight` + `X.weight_scale`) are dequantized on the CPU
to the target dtype by default; `keep_fp8=True` yields them untouched (with their scales) for a future GPU
FP8 GEMM path that keeps them quantized.
"""

from __future__ import annotations

import json
import zlib
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model dir: the index's shards, else model.safetensors, else all *.safetensors."""
    d = Path(model_dir)
    index = d / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [d / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{INDEX_FILE} names shards that are not in {d}: {', '.join(missing)}")
        return files
    if (d / SINGLE_FILE).exists():
        return [d / SINGLE_FILE]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {d}")
    return files


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight (fp8) * scale, computed in fp32. Scale: per output channel [out, 1] / [out], per tensor, or
    2-D blocks [ceil(out/bo), ceil(in/bi)]."""
    w = weight.to(torch.float32)
    s = scale.to(torch.float32)
    if s.dim() == 2 and s.shape[1] > 1:  # block-wise scales
        bo = -(-w.shape[0] // s.shape[0])
        bi = -(-w.shape[1] // s.shape[1])
        s = s.repeat_interleave(bo, 0)[: w.shape[0]].repeat_interleave(bi, 1)[:, : w.shape[1]]
    elif s.numel() > 1:
        s = s.reshape(-1, *([1] * (w.dim() - 1)))
    return (w * s).to(dtype)


def iterate_weights(
    model_dir: str | Path,
    dtype: torch.dtype | None = None,
    *,
    keep_fp8: bool = False,
    show_progress: bool = True,
    skip: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, on the CPU.

    Floating tensors are cast to `dtype` when given, except fp32 ones named `*e_score_correction_bias`
    (precision matters for expert selection; the parameter decides its dtype). FP8 weights are
    dequantized (their `weight_scale` is consumed) unless keep_fp8. Names `skip` accepts are never read.
    """
    from safetensors import safe_open

    files = checkpoint_files(model_dir)
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
        where = {k: h for h in handles for k in h.keys()}
        names = [k for k in where if (keep_fp8 or not k.endswith(".weight_scale")) and not (skip and skip(k))]
        bar = tqdm(total=len(names), desc="Loading weights", unit="tensor", disable=not show_progress)
        try:
            for name in names:
                t = where[name].get_tensor(name)
                if t.dtype in _FP8_DTYPES and not keep_fp8:
                    scale_name = name + "_scale"
                    if scale_name not in where:
                        raise ValueError(f"FP8 tensor {name} has no {scale_name} in the checkpoint")
                    t = dequantize_fp8(t, where[scale_name].get_tensor(scale_name), dtype or torch.bfloat16)
                elif dtype is not None and t.is_floating_point() and t.dtype not in _FP8_DTYPES:
                    if not name.endswith("e_score_correction_bias"):
                        t = t.to(dtype)
                yield name, t
                bar.update(1)
        finally:
            bar.close()


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02, per_parameter_seed: bool = False) -> None:
    """Random weights in place without reading files: matrices N(0, std), norm weights 1 + N(0, 0.01),
    biases and correction biases N(0, 0.01). Small values keep activations of a deep model finite.
    per_parameter_seed: each parameter drawn from a generator seeded by its name, so tensor-parallel ranks
    fill their replicated parameters (norms, router) identically."""
    gen_cache: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        gen = gen_cache.get(p.device)
        if per_parameter_seed:
            gen = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        elif gen is None:
            gen = gen_cache[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() == 1 and leaf == "weight":  # norms
            p.normal_(1.0, 0.01, generator=gen)
        elif p.dim() == 1:
            p.normal_(0.0, 0.01, generator=gen)
        elif p.dtype in _FP8_DTYPES:
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device).mul_(std).to(p.dtype))
        else:
            p.normal_(0.0, std, generator=gen)
