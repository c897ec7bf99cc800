"""Shared helpers for parity tests against transformers (both architectures use them).

- `make_checkpoint(arch, dir, **kw)`: a tiny random HF checkpoint (see glmserve.engine.tiny_checkpoint).
- `load_hf_model(dir)`: transformers' model in fp32 with eager attention (FP8 dirs are dequantized first).
- `hf_logits(hf_model, ids)`: full-sequence logits [T, V] float32; `hf_hidden`: final hidden states [T, H].
- `hf_mtp_reference(hf_model, ids, prev_hidden)`: transformers' own MTP layer; `run_mtp`: ours, paged.
- `load_ours(dir)`: our model through the loader (fp32, CPU, no progress bar).
- `transformers_greedy(dir, lengths, new_tokens, seed)`: random eos-free prompts and transformers'
  greedy `generate` continuation of each (exactly new_tokens tokens).
- `PagedRunner`: drives our model step by step over a paged KV cache with shuffled block ids, any mix of
  prefill chunks, decode tokens and prefix-cache hits; `run_chunks` / `run_steps` are shortcuts.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Sequence

import torch

from glmserve.engine.attention.context import SeqChunk, build_context
from glmserve.engine.attention.torch_backend import TorchAttentionBackend
from glmserve.engine.config import ModelConfig
from glmserve.engine.kv_cache import allocate_kv_caches, kv_cache_spec
from glmserve.engine.tiny_checkpoint import write_tiny_checkpoint

__all__ = [
    "transformers_greedy", "make_checkpoint", "load_hf_model", "dequantized_copy", "hf_logits", "load_ours",
    "PagedRunner", "run_chunks", "run_steps", "random_tokens", "max_abs_diff",
    "hf_hidden", "hf_mtp_reference", "run_mtp",
]


def make_checkpoint(arch: str, directory: str | Path, **kwargs) -> Path:
    """Write a tiny random checkpoint of `arch` into `directory` and return the directory."""
    return Path(write_tiny_checkpoint(arch, directory, **kwargs)["model_dir"])


def dequantized_copy(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy of an FP8 compressed-tensors dir with weight * weight_scale in float32 and no quantization_config."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads((src / "config.json").read_text())
    raw.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(raw))
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            shutil.copy(src / extra, out / extra)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    plain: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if k.endswith("weight_scale"):
            continue
        scale = tensors.get(k + "_scale")
        plain[k] = (t.float() * scale.float().reshape(-1, 1)).contiguous() if scale is not None else t.float()
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def load_hf_model(model_dir: str | Path):
    """transformers' model for `model_dir` in fp32, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the MTP layer's weights are "unexpected" to transformers: expected
    hf_logging.disable_progress_bar()
    model_dir = Path(model_dir)
    if "quantization_config" in json.loads((model_dir / "config.json").read_text()):
        model_dir = dequantized_copy(model_dir, model_dir.parent / (model_dir.name + "-dequant"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def hf_logits(hf_model, token_ids: Sequence[int]) -> torch.Tensor:
    """Logits [T, V] float32 of one full sequence."""
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    return hf_model(input_ids=ids, use_cache=False).logits[0].float()


@torch.no_grad()
def hf_hidden(hf_model, token_ids: Sequence[int]) -> torch.Tensor:
    """Final (normed) hidden states [T, H] of one full sequence."""
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    return hf_model.model(input_ids=ids, use_cache=False).last_hidden_state[0].float()


@torch.no_grad()
def hf_mtp_reference(hf_model, token_ids: Sequence[int], prev_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own MTP layer (MtpModel, loaded from the model's directory) over tokens [T] at positions
    0..T-1 with prev_hidden [T, H]: (hidden after shared_head.norm [T, H], logits [T, V])."""
    from transformers.modeling_layers import MtpModel

    n = hf_model.config.num_hidden_layers
    # transformers finds MTP weights through this list, which only names the full-size models' indices.
    hf_model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}\..*"]
    mtp = MtpModel.from_pretrained(hf_model).eval()
    t = len(token_ids)
    hidden = mtp.forward_layer(
        0, prev_hidden[None].float(), torch.arange(t)[None], None, input_ids=torch.tensor([list(token_ids)])
    )
    return hidden[0].float(), mtp._project_to_logits(hidden)[0].float()


def load_ours(model_dir: str | Path, **kwargs):
    """Our LoadedModel for `model_dir` (fp32 on CPU unless overridden)."""
    from glmserve.engine.loader import load_model

    kwargs = {"dtype": "float32", "device": "cpu", "show_progress": False, "backend": TorchAttentionBackend(), **kwargs}
    return load_model(str(model_dir), **kwargs)


def random_tokens(n: int, vocab_size: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=g).tolist()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


class PagedRunner:
    """Runs our model over a paged cache like the model runner does, with shuffled block ids.

    `model` has forward(input_ids, positions, ctx) and compute_logits(hidden); `cfg` is its ModelConfig.
    Sequences are added with their full token lists; `step([(seq, n), ...])` computes the next n tokens of
    each listed sequence in ONE forward pass and returns their logits. `add(..., share_prefix_of=s,
    shared_blocks=b)` starts a sequence on the first b (full, computed) blocks of sequence s: a prefix hit.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: ModelConfig,
        *,
        block_size: int = 4,
        num_blocks: int = 61,
        seed: int = 0,
        num_cache_layers: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.model, self.cfg, self.block_size = model, cfg, block_size
        self.device = torch.device(device)
        layers = num_cache_layers if num_cache_layers is not None else cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.kv_caches = allocate_kv_caches(kv_cache_spec(cfg, block_size), layers, num_blocks, dtype, self.device)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tokens: list[list[int]] = []
        self.blocks: list[list[int]] = []
        self.done: list[int] = []  # tokens whose KV is in the cache
        self.logits: list[dict[int, torch.Tensor]] = []  # position -> logits row

    def add(self, token_ids: Sequence[int], share_prefix_of: int | None = None, shared_blocks: int = 0) -> int:
        blocks: list[int] = []
        done = 0
        if share_prefix_of is not None and shared_blocks > 0:
            src = share_prefix_of
            done = shared_blocks * self.block_size
            assert self.done[src] >= done, "shared blocks must be computed"
            assert list(token_ids[:done]) == self.tokens[src][:done], "shared prefix must hold the same tokens"
            blocks = self.blocks[src][:shared_blocks]
        self.tokens.append(list(token_ids))
        self.blocks.append(list(blocks))
        self.done.append(done)
        self.logits.append({})
        return len(self.tokens) - 1

    def _grow(self, seq: int, upto: int) -> None:
        need = -(-upto // self.block_size)
        while len(self.blocks[seq]) < need:
            self.blocks[seq].append(self.free.pop())

    @torch.no_grad()
    def step(self, work: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        chunks, ids = [], []
        for seq, n in work:
            start = self.done[seq]
            assert start + n <= len(self.tokens[seq]), "step runs past the sequence's tokens"
            self._grow(seq, start + n)
            chunks.append(SeqChunk(block_ids=list(self.blocks[seq]), num_cached=start, num_new=n))
            ids.extend(self.tokens[seq][start : start + n])
        ctx = build_context(chunks, self.block_size, self.kv_caches, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, ctx.positions, ctx)
        logits = self.model.compute_logits(hidden).float().cpu()
        out, row = [], 0
        for seq, n in work:
            part = logits[row : row + n]
            for j in range(n):
                self.logits[seq][self.done[seq] + j] = part[j]
            self.done[seq] += n
            row += n
            out.append(part)
        return out

    def sequence_logits(self, seq: int, start: int = 0) -> torch.Tensor:
        """Logits [L - start, V] of positions start.. of a fully computed sequence."""
        return torch.stack([self.logits[seq][p] for p in range(start, self.done[seq])])


def run_chunks(model, cfg: ModelConfig, token_ids: Sequence[int], chunk_sizes: Sequence[int], **runner_kw) -> torch.Tensor:
    """Our logits [T, V] for one sequence computed in consecutive chunks (the last size repeats to the end)."""
    runner = PagedRunner(model, cfg, **runner_kw)
    seq = runner.add(token_ids)
    i = 0
    while runner.done[seq] < len(token_ids):
        n = min(chunk_sizes[min(i, len(chunk_sizes) - 1)], len(token_ids) - runner.done[seq])
        runner.step([(seq, n)])
        i += 1
    return runner.sequence_logits(seq)


@torch.no_grad()
def run_mtp(model, cfg: ModelConfig, token_ids: Sequence[int], prev_hidden: torch.Tensor,
            chunk_sizes: Sequence[int] = (10**9,), **runner_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Our MTP layer over tokens [T] at positions 0..T-1 (its own KV cache layer, paged, in chunks):
    (hidden [T, H], logits [T, V])."""
    runner = PagedRunner(model, cfg, **runner_kw)
    seq = runner.add(token_ids)
    hiddens = []
    i = 0
    while runner.done[seq] < len(token_ids):
        start = runner.done[seq]
        n = min(chunk_sizes[min(i, len(chunk_sizes) - 1)], len(token_ids) - start)
        runner._grow(seq, start + n)
        ctx = build_context([SeqChunk(list(runner.blocks[seq]), start, n)], runner.block_size, runner.kv_caches,
                            runner.device)
        ids = torch.tensor(token_ids[start : start + n], dtype=torch.long, device=runner.device)
        prev = prev_hidden[start : start + n].to(runner.device)
        hiddens.append(model.mtp(ids, ctx.positions, prev, ctx))
        runner.done[seq] += n
        i += 1
    hidden = torch.cat(hiddens)
    return hidden.float().cpu(), model.mtp.compute_logits(hidden).float().cpu()


def run_steps(
    model, cfg: ModelConfig, sequences: Sequence[Sequence[int]], steps: Sequence[Sequence[tuple[int, int]]], **runner_kw
) -> list[torch.Tensor]:
    """Run explicit steps [[(seq_index, num_new), ...], ...] over `sequences`; logits [L, V] per sequence."""
    runner = PagedRunner(model, cfg, **runner_kw)
    for s in sequences:
        runner.add(s)
    for work in steps:
        runner.step(work)
    return [runner.sequence_logits(i) for i in range(len(sequences))]


def transformers_greedy(model_dir, lengths: Sequence[int], new_tokens: int,
                        seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts of the given lengths (random, without eos ids) and transformers' greedy continuations,
    exactly new_tokens long (min_new_tokens masks eos as our min_tokens does)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = random.Random(seed)
    eos = set(hf.generation_config.eos_token_id or [])
    allowed = [t for t in range(hf.config.vocab_size) if t not in eos]
    prompts = [[rng.choice(allowed) for _ in range(n)] for n in lengths]
    expected = []
    with torch.no_grad():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            expected.append(out[0, len(ids):].tolist())
    return prompts, expected
