"""Frozen configuration objects.

`ModelConfig` is parsed from a Hugging Face `config.json`, in either the layout the GLM authors publish
(rope_theta / partial_rotary_factor / head_dim at the top level) or the one transformers 5 writes
(`rope_parameters`). Everything else in the engine reads these dataclasses, never raw dicts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmserve.engine.vision_config import VisionConfig, parse_vision_config

SUPPORTED_ARCHS = ("glm4_moe", "glm4_moe_lite", "glm4v_moe")

_ARCH_BY_CLASS = {
    "Glm4MoeForCausalLM": "glm4_moe",
    "Glm4MoeLiteForCausalLM": "glm4_moe_lite",
    "Glm4vMoeForConditionalGeneration": "glm4v_moe",
}
# Keys of a glm4v_moe config.json that live at its top level but describe the text model (they win over
# text_config's: generation_config.json's ids are merged in at the top level).
_VL_TOP_LEVEL_KEYS = ("eos_token_id", "bos_token_id", "pad_token_id", "tie_word_embeddings", "torch_dtype", "dtype",
                      "quantization_config", "compression_config")


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantization of a checkpoint (compressed-tensors FP8, per-output-channel scales)."""

    method: str  # "fp8"
    # Module-name patterns that stay unquantized (compressed-tensors `ignore`), e.g. "lm_head".
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    # glm4_moe: fraction of head_dim that is rotated (NeoX style, the FIRST part of each head).
    partial_rotary_factor: float
    # MoE
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    # Per layer: True when the layer uses a dense MLP instead of MoE.
    dense_layers: tuple[bool, ...]
    # glm4_moe attention
    head_dim: int = 128
    attention_bias: bool = False
    use_qk_norm: bool = False
    # glm4_moe_lite (MLA) attention
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    # Extra RoPE parameters (e.g. yarn); None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Checkpoint dtype name as written in config.json ("bfloat16", ...).
    checkpoint_dtype: str = "bfloat16"
    quant: QuantConfig | None = None
    # glm4v_moe: the vision tower, and M-RoPE's split of the rotary frequencies over (t, h, w).
    vision: VisionConfig | None = None
    mrope_section: tuple[int, ...] = ()

    @property
    def is_mla(self) -> bool:
        return self.arch == "glm4_moe_lite"

    @property
    def rotary_dim(self) -> int:
        """Number of dims of each head that RoPE rotates."""
        if self.is_mla:
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def attention_scale(self) -> float:
        """Softmax scale (1/sqrt(d_qk)), including yarn's mscale for MLA when configured."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling or {}
        if self.is_mla and rs.get("rope_type", "default") not in ("default", None):
            mscale_all_dim = rs.get("mscale_all_dim", 0)
            factor = rs.get("factor", 1.0)
            if mscale_all_dim and factor > 1:
                import math

                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale = scale * m * m
        return scale

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        return parse_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _arch_of(raw: dict[str, Any]) -> str:
    model_type = raw.get("model_type")
    if model_type in SUPPORTED_ARCHS:
        return model_type
    for cls_name in raw.get("architectures") or []:
        if cls_name in _ARCH_BY_CLASS:
            return _ARCH_BY_CLASS[cls_name]
    raise ValueError(
        f"unsupported model: model_type={model_type!r}, architectures={raw.get('architectures')!r}; "
        f"glmserve serves {', '.join(SUPPORTED_ARCHS)}"
    )


def _rope_fields(raw: dict[str, Any], default_partial: float) -> tuple[float, float, dict | None]:
    """(theta, partial_rotary_factor, extra scaling) from either config layout."""
    params = dict(raw.get("rope_parameters") or {})
    legacy_scaling = raw.get("rope_scaling")
    if legacy_scaling:
        params = {**legacy_scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", default_partial))
    rope_type = params.get("rope_type", params.get("type", "default"))
    extra = None
    if rope_type not in (None, "default"):
        extra = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        extra["rope_type"] = rope_type
    return float(theta), float(partial), extra


def _dense_layers(raw: dict[str, Any], n_layers: int, default_first_dense: int) -> tuple[bool, ...]:
    types = raw.get("mlp_layer_types")
    if types:
        return tuple(t == "dense" for t in types[:n_layers])
    k = raw.get("first_k_dense_replace", default_first_dense)
    return tuple(i < k for i in range(n_layers))


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _quant(raw: dict[str, Any]) -> QuantConfig | None:
    q = raw.get("quantization_config") or raw.get("compression_config")
    if not q:
        return None
    method = q.get("quant_method") or q.get("format")
    if method in ("compressed-tensors", "fp8", "float-quantized", "naive-quantized"):
        return QuantConfig(method="fp8", ignore=tuple(q.get("ignore") or ()))
    raise ValueError(f"unsupported quantization_config: {method!r} (glmserve loads FP8 compressed-tensors)")


def _flatten_vl(raw: dict[str, Any]) -> dict[str, Any]:
    """A glm4v_moe config.json as one text-model dict (text_config + the top-level keys that describe it)."""
    flat = dict(raw.get("text_config") or {})
    for key in _VL_TOP_LEVEL_KEYS:
        if raw.get(key) is not None:
            flat[key] = raw[key]
    return flat


def parse_hf_config(raw: dict[str, Any]) -> ModelConfig:
    arch = _arch_of(raw)
    if arch == "glm4v_moe":
        text = _flatten_vl(raw)
        params = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
        section = tuple(int(x) for x in params.get("mrope_section", (8, 12, 12)))
        text["model_type"] = "glm4_moe"
        return parse_hf_config(text).replace(arch=arch, vision=parse_vision_config(raw), mrope_section=section)
    n_layers = int(raw["num_hidden_layers"])
    n_heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    mla = arch == "glm4_moe_lite"
    theta, partial, extra = _rope_fields(raw, default_partial=1.0 if mla else 0.5)
    common: dict[str, Any] = dict(
        arch=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=int(raw.get("num_key_value_heads", n_heads)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
        rope_theta=theta,
        partial_rotary_factor=partial,
        rope_scaling=extra,
        moe_intermediate_size=int(raw["moe_intermediate_size"]),
        n_routed_experts=int(raw["n_routed_experts"]),
        n_shared_experts=int(raw.get("n_shared_experts", 1) or 0),
        num_experts_per_tok=int(raw["num_experts_per_tok"]),
        n_group=int(raw.get("n_group", 1) or 1),
        topk_group=int(raw.get("topk_group", 1) or 1),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        dense_layers=_dense_layers(raw, n_layers, default_first_dense=1),
        attention_bias=bool(raw.get("attention_bias", False)),
        num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers", 0)) or 0),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
        pad_token_id=raw.get("pad_token_id"),
        checkpoint_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        quant=_quant(raw),
    )
    if mla:
        return ModelConfig(
            **common,
            q_lora_rank=raw.get("q_lora_rank"),
            kv_lora_rank=int(raw["kv_lora_rank"]),
            qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
            qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
            v_head_dim=int(raw["v_head_dim"]),
            rope_interleave=bool(raw.get("rope_interleave", True)),
            head_dim=int(raw["qk_nope_head_dim"]) + int(raw["qk_rope_head_dim"]),
        )
    return ModelConfig(
        **common,
        head_dim=int(raw.get("head_dim") or hidden // n_heads),
        use_qk_norm=bool(raw.get("use_qk_norm", False)),
    )


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """config.json, with eos/bos/pad ids from generation_config.json where it has them (it wins: it is what
    generation stops on)."""
    d = Path(model_dir)
    raw = json.loads((d / "config.json").read_text())
    gen_path = d / "generation_config.json"
    if gen_path.exists():
        gen = json.loads(gen_path.read_text())
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if gen.get(key) is not None:
                raw[key] = gen[key]
    return parse_hf_config(raw)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Number of KV blocks; None = derive from memory (gpu_memory_utilization on CUDA, a fixed budget on CPU).
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    # CPU fallback budget for the KV cache, in bytes.
    cpu_kv_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    # Token budget of one engine step (prefill chunks + decode tokens together).
    max_num_batched_tokens: int = 8192
    # Longest slice of one prompt prefilled in a step.
    chunked_prefill_size: int = 8192
    max_model_len: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    load_format: str = "auto"  # auto | safetensors | dummy
    seed: int = 0
    prefill_attention_backend: str = "auto"
    decode_attention_backend: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    show_progress: bool = True
    # Decode steps replay CUDA graphs captured for batch sizes up to this (capped by max_num_seqs); only on
    # CUDA with a graph-safe attention backend (engine/cuda_graphs.py), eager everywhere else.
    enable_cuda_graph: bool = True
    cuda_graph_max_batch_size: int = 512
    # "mtp" builds and loads the checkpoint's MTP layer (the draft model of speculative decoding); "none"
    # leaves it out, its tensors unread (on GLM-4.7 it is ~7.5 GB of bf16 the KV cache keeps instead).
    speculative_algorithm: str = "none"  # none | mtp
    speculative_num_steps: int = 1
    # Ranks of one worker (engine/parallel/): heads, MLPs and experts split; rank 0 schedules and samples.
    tensor_parallel_size: int = 1
    # Routed experts partitioned across the ranks instead of split inside each expert.
    enable_expert_parallel: bool = False
    # A group spanning machines (SGLang's names): nnodes nodes of tensor_parallel_size / nnodes ranks each;
    # node 0 hosts the leader, whose TCP store listens on dist_init_addr (HOST:PORT; None = a free local port).
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    # How long the ranks wait for each other to join, and a collective for a peer (SGLang's --dist-timeout).
    # A dead peer fails a collective at once (its socket closes); this bounds one that hangs without dying.
    dist_timeout_s: float = 60.0

    @property
    def with_mtp(self) -> bool:
        return self.speculative_algorithm == "mtp"
    # Explicit decode batch sizes to capture (vLLM's cudagraph_capture_sizes); empty = 1, 2, 4, 8, 16, 24, ...
    cuda_graph_capture_sizes: tuple[int, ...] = ()
