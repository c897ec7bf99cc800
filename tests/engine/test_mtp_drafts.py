"""The engine's MTP drafts are the MTP layer's greedy predictions in vLLM's layout (input token at i + 1 with
the target's hidden state at i; chained steps feed the MTP layer's hidden state back), after a prefill and
after verify steps. glm4_moe: transformers' own MTP layer is the reference; transformers has none for
glm4_moe_lite, so there our MTP layer run alone (no engine, one sequence, `run_mtp`) on transformers'
hidden states is."""

from __future__ import annotations

import pytest
import torch

from glmserve import SamplingParams
from glmserve.engine.config import EngineConfig
from glmserve.engine.engine import LLMEngine
from tests.engine.hf_reference import (hf_hidden, hf_mtp_reference, load_hf_model, load_ours, make_checkpoint,
                                       random_tokens, run_mtp)

K = 3


def _reference_drafts(hf, mtp, tokens: list[int], k: int) -> list[int]:
    """k chained drafts after `tokens` (prompt + output so far, the last one not yet seen by the target)."""
    h = hf_hidden(hf, tokens[:-1])
    inputs, prev, drafts = list(tokens[1:]), h, []
    for _ in range(k):
        mh, logits = mtp(inputs, prev)
        d = int(logits[-1].argmax())
        drafts.append(d)
        inputs, prev = inputs + [d], torch.cat([prev, mh[-1:]])
    return drafts


@pytest.mark.parametrize("arch", ["glm4_moe", "glm4_moe_lite"])
def test_drafts_equal_transformers_mtp_layer(arch, tmp_path):
    model_dir = make_checkpoint(arch, tmp_path / arch, seed=2)
    hf = load_hf_model(model_dir)
    if arch == "glm4_moe":
        mtp = lambda ids, prev: hf_mtp_reference(hf, ids, prev)  # noqa: E731
    else:
        ours = load_ours(model_dir, with_mtp=True)
        mtp = lambda ids, prev: run_mtp(ours.model, ours.config, ids, prev)  # noqa: E731
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", show_progress=False,
                                    speculative_algorithm="mtp", speculative_num_steps=K))
    prompt = random_tokens(19, engine.model_config.vocab_size, seed=4)
    req = engine.add_request("a", prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    for _ in range(3):  # the prefill step, then two verify steps
        engine.step()
        assert engine.speculator.drafts["a"] == _reference_drafts(hf, mtp, req.token_ids, K)
