"""The single-process engine's greedy tokens: what a distributed run (TP groups, prefill/decode split,
groups across nodes) must reproduce exactly."""

from __future__ import annotations

from glmserve import LLM, SamplingParams


def engine_greedy(model_dir, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy token ids for each prompt (fp32, eos ignored so every run has max_tokens tokens)."""
    llm = LLM(str(model_dir), dtype="float32", show_progress=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)]
