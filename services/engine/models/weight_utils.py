"""Checkpoint names -> our parameters, shared by both GLM architectures.

Our module trees mirror the Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`, ...) except
where we fuse or stack for speed:
- dense MLPs and shared experts: `gate_proj` + `up_proj` -> `gate_up_proj` [2I, H] (gate rows first);
- routed experts: per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` (the published layout) or the
  fused 3-D `mlp.experts.gate_up_proj` [E, 2I, H] / `mlp.experts.down_proj` [E, H, I] (transformers'
  in-memory layout) -> `mlp.w13` [E, 2I, H] and `mlp.w2` [E, H, I];
- router: `mlp.gate.weight` -> `mlp.gate_weight`, `mlp.gate.e_score_correction_bias` -> `mlp.e_score_correction_bias`;
- MTP: `model.layers.{num_hidden_layers}.{enorm,hnorm,eh_proj,shared_head.*,embed_tokens}` -> `mtp.*`, and its
  decoder-layer weights -> `mtp.layer.*` (the same rules as any layer).

`load_named_weights` copies an iterator of (name, tensor) in, checks shapes, refuses unknown names and
reports missing parameters, both with every offending name listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from glmserve.engine.config import ModelConfig


@dataclass(frozen=True)
class WeightTarget:
    """Where a checkpoint tensor goes: a parameter, optionally one expert of it and one half of its rows."""

    param: str
    expert: int | None = None
    half: int | None = None  # 0 = first half of dim 0 (gate), 1 = second half (up)

    def view(self, p: torch.Tensor) -> torch.Tensor:
        if self.expert is not None:
            p = p[self.expert]
        if self.half is not None:
            n = p.shape[0] // 2
            p = p[self.half * n : (self.half + 1) * n]
        return p


class WeightLoadError(ValueError):
    pass


# Rules for the tail of a decoder-layer name (after `...layers.{i}.`); first match wins.
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RULES: list[tuple[re.Pattern, Callable[[re.Match], tuple[str, int | None, int | None]]]] = [
    (re.compile(r"^mlp\.gate\.weight$"), lambda m: ("mlp.gate_weight", None, None)),
    (re.compile(r"^mlp\.gate\.e_score_correction_bias$"), lambda m: ("mlp.e_score_correction_bias", None, None)),
    (re.compile(r"^mlp\.experts\.gate_up_proj$"), lambda m: ("mlp.w13", None, None)),
    (re.compile(r"^mlp\.experts\.down_proj$"), lambda m: ("mlp.w2", None, None)),
    (re.compile(r"^(mlp(?:\.shared_experts)?)\.gate_proj\.weight$"), lambda m: (f"{m[1]}.gate_up_proj.weight", None, 0)),
    (re.compile(r"^(mlp(?:\.shared_experts)?)\.up_proj\.weight$"), lambda m: (f"{m[1]}.gate_up_proj.weight", None, 1)),
]
_MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
            "shared_head.head.weight", "embed_tokens.weight")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Names transformers or older exporters may carry that hold no weights.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|rotary_emb\.cos_cached|rotary_emb\.sin_cached)$")


def layer_tail_target(prefix: str, tail: str) -> WeightTarget:
    """Target of one decoder-layer weight `tail` for a layer whose parameters live under `prefix`."""
    m = _EXPERT.match(tail)
    if m:
        expert, proj = int(m[1]), m[2]
        if proj == "down_proj":
            return WeightTarget(prefix + "mlp.w2", expert=expert)
        return WeightTarget(prefix + "mlp.w13", expert=expert, half=0 if proj == "gate_proj" else 1)
    for pattern, fn in _LAYER_RULES:
        m = pattern.match(tail)
        if m:
            name, expert, half = fn(m)
            return WeightTarget(prefix + name, expert=expert, half=half)
    return WeightTarget(prefix + tail)


def hf_weight_target(name: str, cfg: ModelConfig) -> WeightTarget | None:
    """Our target for checkpoint tensor `name`; None for names that carry nothing to load."""
    if _IGNORED.search(name):
        return None
    m = _LAYER.match(name)
    if not m:
        return WeightTarget(name)
    idx, tail = int(m[1]), m[2]
    if idx < cfg.num_hidden_layers:
        return layer_tail_target(f"model.layers.{idx}.", tail)
    if idx == cfg.num_hidden_layers and cfg.num_nextn_predict_layers > 0:
        if tail in _MTP_OWN:
            return WeightTarget("mtp." + tail)
        return layer_tail_target("mtp.layer.", tail)
    return WeightTarget(name)  # not a parameter of ours: reported as unknown


def is_mtp_weight(name: str, cfg: ModelConfig) -> bool:
    """A checkpoint tensor of the MTP layer (`model.layers.{num_hidden_layers}.*`), scales included."""
    m = _LAYER.match(name)
    return bool(m) and cfg.num_nextn_predict_layers > 0 and int(m[1]) == cfg.num_hidden_layers


def hf_weight_target_without_mtp(name: str, cfg: ModelConfig) -> WeightTarget | None:
    """hf_weight_target for a model built without its MTP layer: the checkpoint's MTP tensors are skipped."""
    return None if is_mtp_weight(name, cfg) else hf_weight_target(name, cfg)


def _fmt(names: Iterable[str], limit: int = 40) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    cfg: ModelConfig,
    target_fn: Callable[[str, ModelConfig], WeightTarget | None] = hf_weight_target,
    optional: Callable[[str], bool] = lambda p: False,
) -> tuple[set[str], set[str]]:
    """Copy checkpoint tensors into `model`'s parameters.

    Returns (fully loaded parameter names, parameters left unloaded that `optional` allowed).
    Raises WeightLoadError listing every unknown checkpoint name, every shape mismatch, every duplicate,
    and every missing parameter that is not optional.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    covered: dict[str, int] = {}
    seen: dict[WeightTarget, str] = {}
    unknown: list[str] = []
    errors: list[str] = []
    for name, tensor in weights:
        target = target_fn(name, cfg)
        if target is None:
            continue
        param = params.get(target.param)
        if param is None:
            unknown.append(name)
            continue
        if target in seen:
            errors.append(f"{name} and {seen[target]} both load {target.param}")
            continue
        try:
            dst = target.view(param.data)
        except IndexError:
            errors.append(f"{name}: expert {target.expert} out of range for {target.param} {tuple(param.shape)}")
            continue
        if tuple(dst.shape) != tuple(tensor.shape):
            errors.append(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(dst.shape)} ({target.param})")
            continue
        with torch.no_grad():
            dst.copy_(tensor)
        seen[target] = name
        covered[target.param] = covered.get(target.param, 0) + dst.numel()
    if unknown:
        raise WeightLoadError(f"checkpoint has {len(unknown)} weights this model does not know: {_fmt(unknown)}")
    if errors:
        raise WeightLoadError("weight loading failed:\n  " + "\n  ".join(errors[:40]))
    loaded = {p for p, n in covered.items() if n == params[p].numel()}
    missing = {p for p in params if p not in loaded}
    not_optional = {p for p in missing if not optional(p)}
    if not_optional:
        partial = {p for p in not_optional if p in covered}
        detail = f" (partially loaded: {_fmt(partial)})" if partial else ""
        raise WeightLoadError(f"checkpoint lacks {len(not_optional)} required weights: {_fmt(not_optional)}{detail}")
    return loaded, missing


def keep_router_fp32(model: nn.Module) -> None:
    """Router weight and correction bias stay fp32 whatever the model dtype (transformers keeps the bias fp32;
    the router logits are computed in fp32 either way)."""
    for module in model.modules():
        for attr in ("gate_weight", "e_score_correction_bias"):
            p = getattr(module, attr, None)
            if isinstance(p, nn.Parameter) and p.dtype != torch.float32:
                p.data = p.data.float()
