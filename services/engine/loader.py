"""load_model: a model directory or preset name -> a ready model on its device.

Steps: resolve the config (config.json + generation_config.json, or a preset), device and dtype; build the
model on the meta device and materialise it directly in the target dtype on the target device (no fp32
copy at full size); keep the router in fp32; then fill it from the checkpoint or with dummy weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.config import ModelConfig, read_model_config
from glmserve.engine.dtypes import resolve_device, resolve_dtype
from glmserve.engine.fp8 import Fp8Layout, convert_to_fp8, load_fp8_weights, plan_fp8
from glmserve.engine.memory_check import check_fits
from glmserve.engine.models.registry import model_class
from glmserve.engine.models.weight_utils import is_mtp_weight, keep_router_fp32
from glmserve.engine.parallel import parallel_state
from glmserve.engine.parallel.sharded_weights import iterate_shard_weights
from glmserve.engine.presets import canonical_preset, preset_config
from glmserve.engine.weights import fill_dummy_weights, iterate_weights

LOAD_FORMATS = ("auto", "safetensors", "dummy")


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    model_dir: Path | None
    dtype: torch.dtype
    device: torch.device


def _resolve_source(model: str, load_format: str) -> tuple[ModelConfig, Path | None, str]:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, not {load_format!r}")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json")
        return read_model_config(path), path, "safetensors" if load_format == "auto" else load_format
    preset = canonical_preset(model)
    if preset is None:
        raise FileNotFoundError(f"{model!r} is neither a model directory nor a preset")
    if load_format == "safetensors":
        raise ValueError(f"preset {preset} has no weights here; use load_format='dummy'")
    return preset_config(preset), None, "dummy"


resolve_source = _resolve_source  # (config, directory or None, load format); raises on a bad model


def build_model(cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, device: torch.device,
                fp8_layout: Fp8Layout | None = None, with_mtp: bool = False) -> nn.Module:
    """An uninitialised model in `dtype` on `device` (router parameters in fp32); with `fp8_layout`, the
    modules whose checkpoint weights are FP8 get FP8 weights (engine/fp8.py), converted before any memory
    is allocated at full precision. with_mtp: build the MTP layer too (speculative decoding only)."""
    with torch.device("meta"):
        model = model_class(cfg.arch)(cfg, backend, with_mtp=with_mtp)
    model = model.to(dtype=dtype)
    if fp8_layout is not None:
        convert_to_fp8(model, fp8_layout, cfg)
    model = model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty un-shares tied parameters
    keep_router_fp32(model)
    return model.eval()


def load_model(
    model: str,
    dtype: str = "auto",
    device: str = "auto",
    load_format: str = "auto",
    backend: AttentionBackend | None = None,
    show_progress: bool = True,
    seed: int = 0,
    with_mtp: bool = False,
) -> LoadedModel:
    """Load `model` (a HF model directory or a preset name such as "GLM-4.7-Flash").

    load_format: "auto" (safetensors for a directory, dummy for a preset), "safetensors", or "dummy"
    (the real config with random weights, no files read). The model keeps `backend` as `.backend`.
    with_mtp: build and load the checkpoint's MTP layer; without it its tensors are not even read.
    """
    cfg, model_dir, fmt = _resolve_source(model, load_format)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, cfg, dev)
    if backend is None:
        from glmserve.engine.attention import registry

        backend = registry.create("auto", dev)
    parallel = parallel_state.current()
    # FP8 checkpoints stay FP8 on GPUs with FP8 tensor cores; everywhere else they are dequantized.
    fp8_layout = plan_fp8(cfg, dev, model_dir) if fmt != "dummy" else None
    with torch.device("meta"):  # count parameters without allocating them
        num_params = sum(p.numel() for p in model_class(cfg.arch)(cfg, backend, with_mtp=with_mtp).parameters())
    per_param = 1 if fp8_layout is not None else torch.finfo(torch_dtype).bits // 8
    check_fits(model, model_dir is None, num_params, per_param, torch_dtype, dev)
    net = build_model(cfg, backend, torch_dtype, dev, fp8_layout=fp8_layout, with_mtp=with_mtp)
    skip = None if with_mtp else (lambda name: is_mtp_weight(name, cfg))
    with torch.no_grad():
        if fmt == "dummy":
            fill_dummy_weights(net, seed=seed, per_parameter_seed=parallel.is_parallel)
        elif parallel.is_parallel:  # only this rank's shard is read
            shard = iterate_shard_weights(model_dir, cfg, parallel, torch_dtype, show_progress=show_progress,
                                          skip=skip, keep_fp8=fp8_layout is not None)
            if fp8_layout is not None:
                load_fp8_weights(net, model_dir, cfg, torch_dtype, weights=shard)
            else:
                net.load_weights(shard)
        elif fp8_layout is not None:
            load_fp8_weights(net, model_dir, cfg, torch_dtype, show_progress=show_progress, skip=skip)
        else:
            net.load_weights(iterate_weights(model_dir, torch_dtype, show_progress=show_progress, skip=skip))
    return LoadedModel(model=net, config=cfg, model_dir=model_dir, dtype=torch_dtype, device=dev)
