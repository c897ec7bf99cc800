"""A tiny glm4_moe checkpoint whose target model AND MTP layer are trained (a few seconds on CPU), so that
MTP drafts are good and acceptance can be measured (random MTP weights accept almost nothing).

Corpus: a fixed random cycle through NUM_TOKENS ordinary token ids (every token has one successor), read
as windows of WINDOW tokens from random starts. A prompt is any stretch of the cycle; its greedy
continuation follows the cycle.
1. The target is trained (transformers' own model class) until every next token of the cycle is its
   argmax by MIN_MARGIN at every position a window reaches.
2. With the target frozen, the MTP layer is trained the way GLM's / DeepSeek's MTP layer is used: at
   position t it takes the target's final hidden state at t and the embedding of token t + 1, and predicts
   token t + 2 (x = eh_proj([enorm(embed(token t+1)), hnorm(h_t)]) -> decoder layer -> shared_head.norm ->
   shared_head.head), until it is right by MIN_MARGIN everywhere.
Both are written in the published layout (the MTP layer at index num_hidden_layers, its own embed_tokens
and shared_head.head), which glmserve's loader reads; transformers itself ignores the MTP layer.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from glmserve.engine.tiny_checkpoint import _checkpoint_names, _mtp_layer_config, _randomise_  # same layout
from glmserve.engine.tiny_model import build_tiny_model

SEED = 7
NUM_TOKENS = 96  # length of the cycle
FIRST_TOKEN = 100  # cycle ids come from [FIRST_TOKEN, FIRST_TOKEN + 4 * NUM_TOKENS): ordinary tokens
WINDOW = 64  # training windows: every position a prompt plus its continuation reaches in the tests
BATCH = 8
LEARNING_RATE = 1e-2
MAX_STEPS = 600
MIN_MARGIN = 2.0


def cycle_tokens(seed: int = SEED) -> list[int]:
    """The corpus: token ids in cycle order (token i is followed by token i + 1, the last by the first)."""
    rng = random.Random(seed)
    return rng.sample(range(FIRST_TOKEN, FIRST_TOKEN + 4 * NUM_TOKENS), NUM_TOKENS)


def cycle_window(cycle: list[int], start: int, length: int) -> list[int]:
    return [cycle[(start + i) % len(cycle)] for i in range(length)]


def _batches(cycle: list[int], rng: random.Random):
    while True:
        yield torch.tensor([cycle_window(cycle, rng.randrange(len(cycle)), WINDOW) for _ in range(BATCH)])


def _eval_batch(cycle: list[int]) -> torch.Tensor:
    """Windows starting at every cycle position modulo a few offsets: every (token, position-range) pair."""
    return torch.tensor([cycle_window(cycle, s, WINDOW) for s in range(0, len(cycle), 8)])


def _margin(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """min over positions of (target logit - best other logit)."""
    target = logits.gather(-1, targets[..., None]).squeeze(-1)
    others = logits.scatter(-1, targets[..., None], float("-inf")).amax(-1)
    return (target - others).min().item()


class MTPHead(nn.Module):
    """The MTP layer in training form, over whole windows (causal attention, no KV cache)."""

    def __init__(self, hf_model):
        super().__init__()
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRMSNorm

        cfg = _mtp_layer_config(hf_model.config)
        cfg._attn_implementation = "sdpa"  # causal when no mask is given
        n, h = hf_model.config.num_hidden_layers, hf_model.config.hidden_size
        self.layer = type(hf_model.model.layers[-1])(cfg, n)
        # A bare transformers module holds uninitialised memory: fill it as the tiny checkpoints are filled.
        state = dict(self.layer.named_parameters())
        state.update({k: v for k, v in self.layer.named_buffers() if k.endswith("e_score_correction_bias")})
        with torch.no_grad():
            _randomise_(sorted(state.items()), torch.Generator().manual_seed(SEED))
        self.enorm = Glm4MoeRMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = Glm4MoeRMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.norm = Glm4MoeRMSNorm(h, cfg.rms_norm_eps)
        self.head = nn.Linear(h, cfg.vocab_size, bias=False)
        self.embed = nn.Embedding(cfg.vocab_size, h)
        with torch.no_grad():  # start from the target's embeddings and head, as the published layers do
            self.embed.weight.copy_(hf_model.model.embed_tokens.weight)
            self.head.weight.copy_(hf_model.lm_head.weight)
        self.rotary = hf_model.model.rotary_emb

    def forward(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [B, T-1, V]: position t from (hidden at t, token t + 1), predicting token t + 2."""
        x = self.eh_proj(torch.cat([self.enorm(self.embed(ids[:, 1:])), self.hnorm(hidden[:, :-1])], dim=-1))
        pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        x = self.layer(x, attention_mask=None, position_ids=pos, position_embeddings=self.rotary(x, pos))
        return self.head(self.norm(x))

    def checkpoint_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        tensors = dict(self.layer.named_parameters())
        tensors.update({k: v for k, v in self.layer.named_buffers() if k.endswith("e_score_correction_bias")})
        tensors.update({"enorm.weight": self.enorm.weight, "hnorm.weight": self.hnorm.weight,
                        "eh_proj.weight": self.eh_proj.weight, "shared_head.norm.weight": self.norm.weight,
                        "shared_head.head.weight": self.head.weight, "embed_tokens.weight": self.embed.weight})
        return _checkpoint_names(prefix, {k: v.detach() for k, v in tensors.items()})


def _train(params, loss_and_margin, batches, eval_fn) -> tuple[int, float]:
    """AdamW until eval_fn()'s margin reaches MIN_MARGIN; returns (steps, margin)."""
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    margin = float("-inf")
    for step in range(MAX_STEPS + 1):
        if step % 25 == 0:
            with torch.no_grad():
                margin = eval_fn()
            if margin >= MIN_MARGIN:
                return step, margin
        loss = loss_and_margin(next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
    raise RuntimeError(f"training did not converge in {MAX_STEPS} steps (smallest margin {margin:.2f})")


def train_mtp_model(out_dir: Path, num_layers: int = 3) -> Path:
    """Build the tiny model (num_layers target layers, the first dense) in out_dir, train its target and MTP
    layer on the cycle, save; returns out_dir. Writes train_info.json (steps, seconds, margins) beside it.
    More target layers make the one MTP layer a smaller share of a step, as in the real models (1 in 48)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    started = time.monotonic()
    out_dir = Path(out_dir)
    build_tiny_model("glm4_moe", out_dir, seed=SEED, overrides={"num_hidden_layers": num_layers})
    hf_logging.set_verbosity_error()  # the MTP layer's tensors are "unexpected" to transformers: expected
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    cycle = cycle_tokens()
    rng = random.Random(SEED)
    evals = _eval_batch(cycle)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared, oversubscribed CPU: threads stall more than they help
    try:
        model.train()

        def target_loss(ids):
            logits = model(input_ids=ids).logits[:, :-1]
            return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

        def target_margin():
            model.eval()
            m = _margin(model(input_ids=evals).logits[:, :-1], evals[:, 1:])
            model.train()
            return m

        t0 = time.monotonic()
        target_steps, target_m = _train(model.parameters(), target_loss, _batches(cycle, rng), target_margin)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)

        mtp = MTPHead(model)
        mtp.train()

        def mtp_loss(ids):
            with torch.no_grad():
                hidden = model.model(input_ids=ids).last_hidden_state
            logits = mtp(ids, hidden)[:, :-1]
            return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 2:].flatten())

        def mtp_margin():
            mtp.eval()
            hidden = model.model(input_ids=evals).last_hidden_state
            m = _margin(mtp(evals, hidden)[:, :-1], evals[:, 2:])
            mtp.train()
            return m

        t1 = time.monotonic()
        mtp_steps, mtp_m = _train(mtp.parameters(), mtp_loss, _batches(cycle, rng), mtp_margin)
        t2 = time.monotonic()
        mtp.eval()
    finally:
        torch.set_num_threads(threads)

    # The target as transformers writes it, plus the MTP layer at index num_hidden_layers.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        weights: dict[str, torch.Tensor] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            weights.update(load_file(str(f)))
    for f in out_dir.glob("*.safetensors"):
        f.unlink()
    weights.update(mtp.checkpoint_tensors(f"model.layers.{model.config.num_hidden_layers}."))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    info = {"target_steps": target_steps, "target_margin": target_m, "mtp_steps": mtp_steps, "mtp_margin": mtp_m,
            "target_seconds": round(t1 - t0, 1), "mtp_seconds": round(t2 - t1, 1),
            "seconds": round(time.monotonic() - started, 1)}
    (out_dir / "train_info.json").write_text(json.dumps(info))
    return out_dir
