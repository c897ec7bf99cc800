"""Which part of each weight a tensor-parallel rank holds: one source for the model (local sizes) and the
loader (what to read from the checkpoint).

- Attention: query heads split evenly. GQA KV heads split evenly when TP <= num KV heads, else each rank
  holds the one KV head its query heads use (replicated on TP / num_kv ranks). MLA: query heads split
  (q_b_proj / q_proj, kv_b_proj, o_proj), the latent projections replicated (every rank caches the latent).
- Dense MLP and shared experts: gate/up split by rows (column parallel), down by columns (row parallel).
- Routed experts: split inside each expert like a dense MLP by default; with expert parallelism each rank
  holds whole experts [rank * E/TP, (rank + 1) * E/TP).
- Embedding and LM head: vocabulary rows split in ceil(V / TP) slices; the last one is zero-padded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from glmserve.engine.config import ModelConfig
from glmserve.engine.parallel.parallel_state import ParallelState, divide


def heads(num_heads: int, st: ParallelState) -> tuple[int, int]:
    """(first query head, number of query heads) of this rank."""
    n = divide(num_heads, st.size, "the number of attention heads")
    return st.rank * n, n


def kv_heads(num_heads: int, num_kv_heads: int, st: ParallelState) -> tuple[int, int]:
    """(first KV head, number of KV heads) this rank holds."""
    if st.size <= num_kv_heads:
        n = divide(num_kv_heads, st.size, "the number of KV heads")
        return st.rank * n, n
    if st.size % num_kv_heads:
        raise ValueError(f"the tensor-parallel size {st.size} is neither a divisor nor a multiple of the "
                         f"number of KV heads ({num_kv_heads})")
    first_q, _ = heads(num_heads, st)
    return first_q // (num_heads // num_kv_heads), 1  # the KV head this rank's query heads read


def vocab(vocab_size: int, st: ParallelState) -> tuple[int, int, int]:
    """(first row, rows holding real tokens, padded rows per rank) of the embedding / LM head."""
    per = -(-vocab_size // st.size)
    start = min(st.rank * per, vocab_size)
    return start, min(vocab_size, start + per) - start, per


def experts(num_experts: int, st: ParallelState) -> tuple[int, int]:
    """(first routed expert, number of experts) this rank holds: all of them unless expert parallel."""
    if not st.expert_parallel:
        return 0, num_experts
    n = divide(num_experts, st.size, "the number of routed experts")
    return st.rank * n, n


def expert_intermediate(cfg: ModelConfig, st: ParallelState) -> int:
    """Intermediate size of each routed expert on this rank (whole experts under expert parallelism)."""
    if st.expert_parallel:
        return cfg.moe_intermediate_size
    return divide(cfg.moe_intermediate_size, st.size, "moe_intermediate_size")


@dataclass(frozen=True)
class Slice:
    """What a rank reads of one checkpoint tensor: rows `ranges` of dim `dim` (concatenated in order),
    zero-padded to `pad_to` rows along that dim; `name` is what the loader sees (experts renumbered)."""

    name: str
    dim: int | None = None  # None = the whole tensor
    ranges: tuple[tuple[int, int], ...] = ()  # (start, length) pieces
    pad_to: int | None = None


_LAYER = re.compile(r"^(model\.layers\.\d+\.)(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight)$")
_HEAD_ROWS = re.compile(r"^self_attn\.(q_proj|q_b_proj|kv_b_proj)\.(weight|bias)$")
_KV_ROWS = re.compile(r"^self_attn\.(k_proj|v_proj)\.(weight|bias)$")
_MLP_ROWS = re.compile(r"^mlp\.(shared_experts\.)?(gate_proj|up_proj)\.weight$")
_MLP_COLS = re.compile(r"^mlp\.(shared_experts\.)?down_proj\.weight$")


def _even(n: int, st: ParallelState, what: str) -> tuple[int, int]:
    k = divide(n, st.size, what)
    return st.rank * k, k


def checkpoint_slice(name: str, shape: tuple[int, ...], cfg: ModelConfig, st: ParallelState) -> Slice | None:
    """The part of checkpoint weight or bias `name` (full shape `shape`) this rank loads; None = not this
    rank's (another rank's expert). FP8 scales follow their weight (sharded_weights.py)."""
    if st.size == 1:
        return Slice(name)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        start, n, per = vocab(cfg.vocab_size, st)
        return Slice(name, 0, ((start, n),), pad_to=per)
    m = _LAYER.match(name)
    if not m:
        return Slice(name)
    prefix, tail = m[1], m[2]
    if (e := _EXPERT.match(tail)) is not None:
        first, count = experts(cfg.n_routed_experts, st)
        idx = int(e[1])
        if st.expert_parallel:
            if not first <= idx < first + count:
                return None
            return Slice(f"{prefix}mlp.experts.{idx - first}.{e[2]}.{e[3]}")
        dim = 1 if e[2] == "down_proj" else 0
        return Slice(name, dim, (_even(shape[dim], st, "moe_intermediate_size"),))
    if tail in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):  # transformers' fused 3-D layout
        if st.expert_parallel:
            return Slice(name, 0, (experts(cfg.n_routed_experts, st),))
        if tail.endswith("down_proj"):
            return Slice(name, 2, (_even(shape[2], st, "moe_intermediate_size"),))
        half = shape[1] // 2
        start, n = _even(half, st, "moe_intermediate_size")
        return Slice(name, 1, ((start, n), (half + start, n)))
    if _HEAD_ROWS.match(tail):
        return Slice(name, 0, (_even(shape[0], st, "the number of attention heads"),))
    if _KV_ROWS.match(tail):
        first, n = kv_heads(cfg.num_attention_heads, cfg.num_key_value_heads, st)
        d = shape[0] // cfg.num_key_value_heads
        return Slice(name, 0, ((first * d, n * d),))
    if _MLP_ROWS.match(tail):
        return Slice(name, 0, (_even(shape[0], st, "the MLP intermediate size"),))
    if _MLP_COLS.match(tail) or tail == "self_attn.o_proj.weight":
        return Slice(name, 1, (_even(shape[1], st, "the row-parallel input size"),))
    return Slice(name)
