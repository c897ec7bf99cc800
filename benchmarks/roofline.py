"""Bytes and FLOPs of a GLM step from its config: the floors the measurements are compared with
(benchmarks/README.md, Yardsticks).

Decode is bandwidth-bound: a step must read every weight it uses once (attention and dense layers,
shared experts, the experts the batch routes to, lm_head) plus each sequence's cached KV, so
floor = bytes / copy bandwidth. Prefill is compute-bound: floor = FLOPs / matmul rate, with FLOPs =
2 x (weights each token multiplies) + attention (causal pairs, MLA on the absorbed path the kernels run).
"""

from __future__ import annotations

from dataclasses import dataclass

from glmserve.engine.config import ModelConfig


@dataclass(frozen=True)
class LayerParams:
    """Weight elements per layer kind (a token touches all of `attention` and either `dense_mlp` or
    router + shared + top_k routed experts)."""

    attention: int
    dense_mlp: int
    router: int
    shared_experts: int
    per_expert: int
    lm_head: int


def layer_params(cfg: ModelConfig) -> LayerParams:
    h = cfg.hidden_size
    if cfg.is_mla:
        qk, heads = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.num_attention_heads
        q = h * heads * qk if cfg.q_lora_rank is None else h * cfg.q_lora_rank + cfg.q_lora_rank * heads * qk
        kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        attention = q + kv + heads * cfg.v_head_dim * h
    else:
        d = cfg.head_dim
        attention = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    return LayerParams(
        attention=attention,
        dense_mlp=3 * h * cfg.intermediate_size,
        router=cfg.n_routed_experts * h,
        shared_experts=3 * h * cfg.moe_intermediate_size * cfg.n_shared_experts,
        per_expert=3 * h * cfg.moe_intermediate_size,
        lm_head=cfg.vocab_size * h,
    )


def kv_bytes_per_token(cfg: ModelConfig, kv_bytes: int = 2) -> int:
    """Cache bytes of one token over all layers (MLA: latent + shared rope key; GQA: K and V)."""
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) if cfg.is_mla else 2 * cfg.num_key_value_heads * cfg.head_dim
    return per_layer * kv_bytes * cfg.num_hidden_layers


def expected_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts a batch of `tokens` routes to in one layer, with uniform top-k routing."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def decode_bytes(cfg: ModelConfig, batch: int, context: int, weight_bytes: float = 2, kv_bytes: int = 2) -> dict:
    """Bytes one decode step of `batch` sequences with `context` cached tokens must read.
    weight_bytes = 1 for FP8 linear/expert weights (lm_head and MLA's kv_b_proj stay 16-bit then)."""
    p = layer_params(cfg)
    n_dense = sum(cfg.dense_layers[: cfg.num_hidden_layers])
    n_moe = cfg.num_hidden_layers - n_dense
    touched = expected_experts_touched(cfg.n_routed_experts, cfg.num_experts_per_tok, batch)
    kv_b = cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) if cfg.is_mla else 0
    attention = cfg.num_hidden_layers * ((p.attention - kv_b) * weight_bytes + kv_b * 2)
    mlp = n_dense * p.dense_mlp * weight_bytes + n_moe * (p.router * 4 + (p.shared_experts + touched * p.per_expert) * weight_bytes)
    weights = attention + mlp + p.lm_head * 2
    kv = batch * (context + 1) * kv_bytes_per_token(cfg, kv_bytes)
    return {"weights": weights, "kv": kv, "total": weights + kv, "experts_touched_per_layer": touched}


def prefill_flops(cfg: ModelConfig, chunk: int, cached: int = 0) -> dict:
    """FLOPs of prefilling `chunk` new tokens of one sequence after `cached` ones (logits for the last)."""
    p = layer_params(cfg)
    n_dense = sum(cfg.dense_layers[: cfg.num_hidden_layers])
    n_moe = cfg.num_hidden_layers - n_dense
    per_token = (cfg.num_hidden_layers * p.attention + n_dense * p.dense_mlp
                 + n_moe * (p.router + p.shared_experts + cfg.num_experts_per_tok * p.per_expert))
    linear = 2 * per_token * chunk + 2 * p.lm_head
    pairs = chunk * cached + chunk * (chunk + 1) // 2  # causal (query, key) pairs
    heads = cfg.num_attention_heads
    if cfg.is_mla:
        r, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        # absorbed: scores over [latent | rope] (R + Dr), output over the latent (R); plus W_UK / W_UV per token
        attention = 2 * heads * pairs * (2 * r + dr) + 2 * heads * chunk * r * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    else:
        attention = 4 * heads * cfg.head_dim * pairs
    attention *= cfg.num_hidden_layers
    return {"linear": linear, "attention": attention, "total": linear + attention}


def mtp_layer_bytes(cfg: ModelConfig, batch: int, tokens_per_seq: int, context: int, weight_bytes: float = 2,
                    kv_bytes: int = 2) -> float:
    """Bytes one forward of the MTP layer over `tokens_per_seq` tokens of `batch` sequences reads: its decoder
    layer (MoE, experts the tokens route to), eh_proj, its own lm_head, and its KV layer."""
    p = layer_params(cfg)
    touched = expected_experts_touched(cfg.n_routed_experts, cfg.num_experts_per_tok, batch * tokens_per_seq)
    eh_proj = 2 * cfg.hidden_size * cfg.hidden_size
    weights = (p.attention + eh_proj + p.shared_experts + touched * p.per_expert) * weight_bytes + p.router * 4
    kv = batch * (context + tokens_per_seq) * kv_bytes_per_token(cfg, kv_bytes) / cfg.num_hidden_layers
    return weights + p.lm_head * 2 + kv


def spec_step_bytes(cfg: ModelConfig, batch: int, context: int, k: int, weight_bytes: float = 2) -> dict:
    """Bytes of one MTP speculative step with k drafts: the target's verify forward over k + 1 tokens per
    sequence, the MTP layer's pass over those positions and its k - 1 chained one-token steps."""
    tokens = batch * (k + 1)
    target = decode_bytes(cfg, tokens, 0, weight_bytes=weight_bytes)
    verify = target["weights"] + batch * (context + k + 1) * kv_bytes_per_token(cfg)
    draft = mtp_layer_bytes(cfg, batch, k + 1, context, weight_bytes)
    draft += sum(mtp_layer_bytes(cfg, batch, 1, context + k + s, weight_bytes) for s in range(1, k))
    return {"verify": verify, "draft": draft, "total": verify + draft}
