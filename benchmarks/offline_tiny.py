"""Offline engine throughput and tiny-model build time on CPU (the figures of the engine's closing note).

    .venv/bin/python benchmarks/offline_tiny.py --out benchmarks/results/cpu/offline_tiny.json
Builds both tiny checkpoints (timed), then greedy-generates for a batch of 16 prompts with the offline
`LLM` API and reports output tokens per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_common import environment, print_table, write_json

from glmserve import LLM, SamplingParams
from glmserve.engine.tiny_model import build_tiny_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results/cpu/offline_tiny.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("glm4_moe", "glm4_moe_lite"):
            start = time.perf_counter()
            model_dir = build_tiny_model(arch, Path(tmp) / arch, seed=0)
            build_s = time.perf_counter() - start
            llm = LLM(str(model_dir), dtype="float32", show_progress=False)
            prompts = [{"prompt_token_ids": list(range(10 + i, 10 + i + args.prompt_len))} for i in range(args.batch)]
            llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm up
            params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append({"arch": arch, "build_s": build_s, "batch": args.batch, "prompt_len": args.prompt_len,
                         "output_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds})
    print_table(f"offline greedy generation, batch {args.batch}, CPU threads {torch.get_num_threads()}", rows,
                [("arch", "arch", ""), ("build_s", "build s", ".2f"), ("output_tokens", "tokens", "d"),
                 ("seconds", "s", ".2f"), ("tokens_per_s", "tok/s", ".0f")])
    write_json(args.out, {"environment": environment(torch.device("cpu")), "arguments": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
