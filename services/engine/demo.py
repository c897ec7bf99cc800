"""`glmserve demo`: offline generation with the built-in tiny model, and its throughput."""

from __future__ import annotations

import time

from glmserve.engine.llm import LLM
from glmserve.engine.sampling_params import SamplingParams


def run_demo(model: str, dtype: str, max_tokens: int) -> int:
    llm = LLM(model=model, dtype=dtype)
    prompts = ["The capital of France is", "def fibonacci(n):", "GLM-4.7 is a model that"]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for out in outs:
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"{n} tokens in {elapsed:.2f}s ({n / elapsed:.1f} tokens/s); random weights, so the text is noise")
    return 0
