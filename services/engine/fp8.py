"""FP8 checkpoints on GPU: weights stay float8_e4m3fn, activations are quantized per token on the fly, and
the GEMMs run on FP8 tensor cores.

When: the checkpoint is FP8 compressed-tensors with per-channel (or per-tensor) weight scales and the
device is CUDA with compute capability >= 8.9 (`plan_fp8`). Anywhere else the loader dequantizes to the
model dtype, as it always did (weights.iterate_weights).

How it loads (no model code changes, only the Linear hook in layers.py):
1. `checkpoint_fp8_layout` reads the safetensors headers only: which weights are FP8, their scale shapes.
2. `convert_to_fp8` (on the meta model, before materialising) turns each module whose checkpoint weight is
   FP8 into an FP8 module: a float8 weight parameter and an fp32 scale *buffer* ([out] for a Linear,
   [E, 2I] / [E, H] for the experts). Buffers, so load_named_weights never asks the checkpoint for them.
3. The weight stream passes FP8 weights through untouched (fp8 -> fp8 copy) and takes `*.weight_scale`
   aside; `assign_scales` then writes each scale through the same name mapping as its weight (the
   model's `checkpoint_target`, else hf_weight_target: experts, gate/up halves and MTP included).
   `input_scale` (static activation scales) is ignored: activations are always quantized per token.
4. `finish_fp8`: Linear layers get the FP8 GEMM hook, MoE layers FP8 experts; kv_b_proj is dequantized
   (MLA's absorbed attention reads it as per-head matrices, not through a GEMM).

The GEMMs: torch._scaled_mm with row-wise scales on sm90+ (cuBLASLt/CUTLASS), else the Triton kernel
in kernels/fp8_gemm.py; experts always through the Triton grouped FP8 MoE. On CPU (tests) the same
modules run the dequantized reference, so the FP8 model path is testable without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from glmserve.engine.attention.capability import cuda_capability
from glmserve.engine.config import ModelConfig
from glmserve.engine.models.layers import Linear
from glmserve.engine.models.moe import MoE
from glmserve.engine.models.weight_utils import WeightLoadError, WeightTarget, hf_weight_target

FP8_DTYPE = torch.float8_e4m3fn
MIN_CAPABILITY = (8, 9)  # Ada / Hopper and newer have FP8 tensor cores
SCALED_MM_CAPABILITY = (9, 0)  # torch._scaled_mm's row-wise scaling kernels
# Linear layers that must stay in the model dtype: MLA's absorbed attention reads kv_b_proj's weight as
# per-head matrices (MLAWeights), not through Linear.forward.
DEQUANTIZED_MODULES = ("kv_b_proj",)
_SAFETENSORS_FP8 = ("F8_E4M3",)


# -- capability -----------------------------------------------------------------------------------

def fp8_gemm_supported(device: torch.device) -> bool:
    """FP8 tensor-core GEMMs can run on `device` (CUDA, capability >= 8.9, torch with float8_e4m3fn)."""
    cap = cuda_capability(torch.device(device))
    return cap is not None and tuple(cap) >= MIN_CAPABILITY and hasattr(torch, "float8_e4m3fn")


@dataclass
class Fp8Layout:
    """What the checkpoint's headers say: FP8 weight name -> shape, and each scale's shape."""

    weights: dict[str, tuple[int, ...]] = field(default_factory=dict)
    scales: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def blockwise(self) -> bool:
        return any(len(s) == 2 and s[1] > 1 for s in self.scales.values())


def checkpoint_fp8_layout(model_dir: str | Path) -> Fp8Layout:
    """Read the safetensors headers (no tensor data) for FP8 weights and their scales."""
    from safetensors import safe_open

    from glmserve.engine.weights import checkpoint_files

    layout = Fp8Layout()
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                if sl.get_dtype() in _SAFETENSORS_FP8:
                    layout.weights[name] = tuple(sl.get_shape())
                elif name.endswith(".weight_scale"):
                    layout.scales[name] = tuple(sl.get_shape())
    return layout


def keep_fp8_reason(cfg: ModelConfig, device: torch.device, layout: Fp8Layout | None) -> str | None:
    """Why the FP8 GEMM path cannot be used (the loader dequantizes instead), or None when it can."""
    if cfg.quant is None or cfg.quant.method != "fp8":
        return "the checkpoint is not FP8"
    if not fp8_gemm_supported(device):
        return f"device {str(torch.device(device))!r} has no FP8 tensor cores (needs CUDA capability >= 8.9)"
    if layout is None or not layout.weights:
        return "the checkpoint holds no FP8 weights"
    if layout.blockwise:
        return "block-wise FP8 scales are not supported by the FP8 GEMMs (per-channel or per-tensor only)"
    missing = [n for n in layout.weights if n + "_scale" not in layout.scales]
    if missing:
        return f"FP8 weights without a weight_scale: {', '.join(missing[:5])}"
    return None


def plan_fp8(cfg: ModelConfig, device: torch.device, model_dir: str | Path | None) -> Fp8Layout | None:
    """The layout to keep in FP8, or None to dequantize (anything but an FP8 checkpoint on a capable GPU)."""
    if cfg.quant is None or model_dir is None or not fp8_gemm_supported(device):
        return None  # cheap exits first: no header reads on CPU
    layout = checkpoint_fp8_layout(model_dir)
    return layout if keep_fp8_reason(cfg, device, layout) is None else None


# -- GEMMs ----------------------------------------------------------------------------------------

def _use_scaled_mm(device: torch.device, n: int, k: int) -> bool:
    cap = cuda_capability(device)
    return (cap is not None and tuple(cap) >= SCALED_MM_CAPABILITY and hasattr(torch, "_scaled_mm")
            and n % 16 == 0 and k % 16 == 0)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (weight * weight_scale)^T + bias with x quantized per token: the Linear FP8 hook."""
    from glmserve.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref, quantize_per_token

    lead = x.shape[:-1]
    n, k = weight.shape
    x8, xs = quantize_per_token(x)
    if not x.is_cuda:
        out = fp8_gemm_ref(x8, xs, weight, weight_scale, bias, out_dtype=x.dtype)
    elif _use_scaled_mm(x.device, n, k) and x8.shape[0] > 0:
        # Row-wise scaling: scale_a [M, 1], scale_b [1, N], bf16 output (the only one it supports).
        out = torch._scaled_mm(x8, weight.t(), scale_a=xs[:, None], scale_b=weight_scale.float()[None, :],
                               out_dtype=torch.bfloat16)
        if bias is not None:
            out = out + bias
        out = out.to(x.dtype)
    else:
        out = fp8_gemm(x8, xs, weight, weight_scale, bias, out_dtype=x.dtype)
    return out.view(*lead, n)


class Fp8Experts:
    """MoE.experts_fn for FP8 experts: reads the scales from the MoE module at call time (they are
    buffers, replaced when the module moves), Triton grouped FP8 GEMMs on CUDA, the reference on CPU."""

    def __init__(self, moe: MoE):
        self.moe = moe

    def __call__(self, x, topk_weights, topk_ids, w13, w2):
        from glmserve.kernels.fp8_gemm import fp8_fused_moe, fp8_fused_moe_ref

        fn = fp8_fused_moe if x.is_cuda else fp8_fused_moe_ref
        return fn(x, topk_weights, topk_ids, w13, w2, self.moe.w13_scale, self.moe.w2_scale)


# -- model conversion -----------------------------------------------------------------------------

def _fp8_param(like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(like.shape, dtype=FP8_DTYPE, device=like.device), requires_grad=False)


def _make_fp8_linear(lin: Linear) -> None:
    lin.weight = _fp8_param(lin.weight)
    lin.weight_scale = torch.empty(lin.out_features, dtype=torch.float32, device=lin.weight.device)


def _make_fp8_moe(moe: MoE) -> None:
    moe.w13 = _fp8_param(moe.w13)
    moe.w2 = _fp8_param(moe.w2)
    dev = moe.w13.device
    moe.register_buffer("w13_scale", torch.empty(moe.w13.shape[:2], dtype=torch.float32, device=dev), persistent=False)
    moe.register_buffer("w2_scale", torch.empty(moe.w2.shape[:2], dtype=torch.float32, device=dev), persistent=False)


def _module_of(model: nn.Module, param: str) -> tuple[nn.Module | None, str]:
    path, _, leaf = param.rpartition(".")
    try:
        return model.get_submodule(path), leaf
    except AttributeError:
        return None, leaf


def _target_fn(model: nn.Module) -> Callable[[str, ModelConfig], WeightTarget | None]:
    """The model's own checkpoint-name mapping (glm4v_moe: `model.language_model.*`, `model.visual.*`),
    else the text models' one; weights and their scales go through the same one."""
    return getattr(model, "checkpoint_target", None) or hf_weight_target


def convert_to_fp8(model: nn.Module, layout: Fp8Layout, cfg: ModelConfig) -> set[str]:
    """Make every module whose checkpoint weight is FP8 an FP8 module (works on the meta device).
    Returns the converted modules' names."""
    converted: set[str] = set()
    target_fn = _target_fn(model)
    for name in layout.weights:
        target = target_fn(name, cfg)
        if target is None:
            continue
        module, leaf = _module_of(model, target.param)
        path = target.param.rpartition(".")[0]
        if module is None or path in converted:
            continue  # unknown names are reported by the weight loader itself
        if isinstance(module, Linear) and leaf == "weight":
            _make_fp8_linear(module)
        elif isinstance(module, MoE) and leaf in ("w13", "w2"):
            _make_fp8_moe(module)
        else:
            raise WeightLoadError(f"{name} is FP8 but {target.param} is not a Linear or expert weight")
        converted.add(path)
    return converted


def _scale_target(model: nn.Module, param: str) -> torch.Tensor | None:
    """The scale buffer that belongs to weight parameter `param` (None when the module is gone, e.g. an
    MTP layer the checkpoint did not fill)."""
    module, leaf = _module_of(model, param)
    if module is None:
        return None
    attr = "weight_scale" if leaf == "weight" else f"{leaf}_scale"
    return getattr(module, attr, None)


def split_scales(weights, scales: dict[str, torch.Tensor]):
    """Pass the weight stream through, keeping `*.weight_scale` tensors aside and dropping `*.input_scale`."""
    for name, t in weights:
        if name.endswith(".weight_scale"):
            scales[name] = t
        elif not name.endswith(".input_scale"):
            yield name, t


def assign_scales(model: nn.Module, scales: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Write checkpoint scales into the scale buffers, through the weights' own name mapping. Every FP8
    module must end up with all its scales (the buffers start as NaN, so a gap shows)."""
    target_fn = _target_fn(model)
    for name, scale in scales.items():
        target = target_fn(name[: -len("_scale")], cfg)
        if target is None:
            continue
        buf = _scale_target(model, target.param)
        if buf is None:
            if target.param.startswith("mtp."):
                continue  # the MTP layer was dropped (the checkpoint had no MTP weights)
            raise WeightLoadError(f"{name}: {target.param} is not an FP8 weight")
        dst = target.view(buf)
        src = scale.to(torch.float32).reshape(-1)
        if src.numel() == 1:  # per-tensor scale: the same for every output channel
            src = src.expand(dst.numel())
        if src.numel() != dst.numel():
            raise WeightLoadError(f"{name}: {src.numel()} scales for {dst.numel()} output channels")
        dst.copy_(src.view(dst.shape))
    for mod_name, module in model.named_modules():
        for attr in ("weight_scale", "w13_scale", "w2_scale"):
            buf = getattr(module, attr, None)
            if isinstance(buf, torch.Tensor) and bool(torch.isnan(buf).any()):
                raise WeightLoadError(f"checkpoint lacks FP8 scales for {mod_name}.{attr}")


def finish_fp8(model: nn.Module, dtype: torch.dtype) -> None:
    """Install the FP8 GEMM hooks; dequantize the layers that must stay in `dtype`."""
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.weight.dtype == FP8_DTYPE:
            if name.rpartition(".")[2] in DEQUANTIZED_MODULES:
                w = module.weight.float() * module.weight_scale[:, None]
                module.weight = nn.Parameter(w.to(dtype), requires_grad=False)
                module.weight_scale = None
                module.fp8_gemm = None
            else:
                module.fp8_gemm = fp8_linear
        elif isinstance(module, MoE) and module.w13.dtype == FP8_DTYPE:
            module.experts_fn = Fp8Experts(module)


@torch.no_grad()
def load_fp8_weights(model: nn.Module, model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype,
                     show_progress: bool = True, skip: Callable[[str], bool] | None = None,
                     weights: Iterable[tuple[str, torch.Tensor]] | None = None) -> set[str]:
    """Load an FP8 checkpoint into a model already converted by `convert_to_fp8`; names `skip` accepts are
    not read. weights: the (name, tensor) stream with FP8 weights and their scales kept (default: the whole
    checkpoint; a tensor-parallel rank passes its shard's)."""
    from glmserve.engine.weights import iterate_weights

    for module in model.modules():
        for attr in ("weight_scale", "w13_scale", "w2_scale"):
            buf = getattr(module, attr, None)
            if isinstance(buf, torch.Tensor):
                buf.fill_(float("nan"))
    scales: dict[str, torch.Tensor] = {}
    if weights is None:
        weights = iterate_weights(model_dir, dtype, keep_fp8=True, show_progress=show_progress, skip=skip)
    loaded = model.load_weights(split_scales(weights, scales))
    assign_scales(model, scales, cfg)
    finish_fp8(model, dtype)
    return loaded


# -- quantizing a loaded model (dummy-weight benchmarks, tests) -----------------------------------

def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (last dim reduced) symmetric FP8 of w [..., out, in]."""
    from glmserve.kernels.fp8_gemm import FP8_MAX

    scale = (w.float().abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


@torch.no_grad()
def quantize_model_fp8(model: nn.Module, skip: tuple[str, ...] = ("lm_head", "head")) -> int:
    """Quantize a loaded model's Linear and expert weights to FP8 per channel, as an FP8 checkpoint would
    have them, and install the FP8 GEMMs (lets dummy-weight runs measure the FP8 path). Returns the
    number of modules converted."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != FP8_DTYPE)
    n = 0
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if name.startswith("visual."):
            continue  # the VL models' vision tower: the FP8 releases keep it in bf16
        if isinstance(module, Linear) and leaf not in skip + DEQUANTIZED_MODULES and module.weight.dtype != FP8_DTYPE:
            w8, s = _quantize_rows(module.weight)
            module.weight = nn.Parameter(w8, requires_grad=False)
            module.weight_scale = s
            n += 1
        elif isinstance(module, MoE) and module.w13.dtype != FP8_DTYPE:
            w13, s13 = _quantize_rows(module.w13)
            w2, s2 = _quantize_rows(module.w2)
            module.w13 = nn.Parameter(w13, requires_grad=False)
            module.w2 = nn.Parameter(w2, requires_grad=False)
            module.register_buffer("w13_scale", s13, persistent=False)
            module.register_buffer("w2_scale", s2, persistent=False)
            n += 1
    finish_fp8(model, dtype)
    return n


__all__ = [
    "DEQUANTIZED_MODULES", "Fp8Experts", "Fp8Layout", "assign_scales", "checkpoint_fp8_layout", "convert_to_fp8",
    "finish_fp8", "fp8_gemm_supported", "fp8_linear", "keep_fp8_reason", "load_fp8_weights", "plan_fp8",
    "quantize_model_fp8", "split_scales",
]
