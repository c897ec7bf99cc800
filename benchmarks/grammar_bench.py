"""Grammar-constrained decoding costs on CPU: compile time per grammar, and the per-step cost of the token
bitmask (fill every row's mask + apply it to the logits) at batch 1 and 64.

    .venv/bin/python benchmarks/grammar_bench.py --out benchmarks/results/cpu/grammar.json

Two vocabularies: the tiny model's real tokenizer (1,000 tokens) and a synthetic byte-level vocabulary
of GLM-4.x's size (151,552 tokens, seeded random strings), since a GLM tokenizer is not shipped here.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import xgrammar as xgr

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import environment, print_table, write_json  # noqa: E402

from glmserve.engine.structured_output.manager import FILL_THREADS  # noqa: E402
from glmserve.engine.structured_output.tokenizer_info import tokenizer_info  # noqa: E402
from glmserve.engine.tiny_tokenizer import TINY_ASSETS_DIR  # noqa: E402
from tests.structured.schemas import SCHEMAS  # noqa: E402

GLM_VOCAB = 151_552


def synthetic_info(size: int, seed: int = 0) -> xgr.TokenizerInfo:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_{}[]\":,.-+ "
    vocab = [chr(i) for i in range(32, 127)]
    seen = set(vocab)
    while len(vocab) < size - 1:
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 10)))
        if t not in seen:
            seen.add(t)
            vocab.append(t)
    vocab.append("")  # the eos token (special)
    return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=size, stop_token_ids=[size - 1])


def compile_times(info: xgr.TokenizerInfo) -> list[dict]:
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    tool = {"type": "structural_tag", "format": {"type": "tags_with_separator", "separator": "\n",
            "at_least_one": True, "stop_after_first": False, "tags": [
                {"type": "tag", "begin": "<tool_call>get_weather", "end": "</tool_call>",
                 "content": {"type": "json_schema", "style": "glm_xml", "json_schema": SCHEMAS[10]}}]}}
    cases = [(f"json schema {i}", lambda s=s: compiler.compile_json_schema(json.dumps(s), any_whitespace=False))
             for i, s in enumerate(SCHEMAS)]
    cases += [("json_object", lambda: compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)),
              ("regex", lambda: compiler.compile_regex(r"[a-z]{3}-\d{2,4}")),
              ("choice", lambda: compiler.compile_grammar('root ::= "alpha" | "beta" | "gamma"')),
              ("glm tool call", lambda: compiler.compile_structural_tag(json.dumps(tool)))]
    out = []
    for name, fn in cases:
        start = time.perf_counter()
        fn()
        out.append({"grammar": name, "compile_ms": (time.perf_counter() - start) * 1e3})
    return out


def step_cost(info: xgr.TokenizerInfo, batch: int, steps: int) -> dict:
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiled = compiler.compile_json_schema(json.dumps(SCHEMAS[11]), any_whitespace=False)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    for m in matchers:
        m.accept_string('{"items": [{"k": "ab')  # inside a string: the widest masks
    bitmask = xgr.allocate_token_bitmask(batch, info.vocab_size)
    logits = torch.randn(batch, info.vocab_size)
    fill, apply = [], []
    batch_matcher = xgr.BatchGrammarMatcher(max_threads=FILL_THREADS)
    for _ in range(steps):
        t0 = time.perf_counter()
        if batch == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:  # as the engine does (structured_output/manager.py)
            batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask)
        t1 = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=info.vocab_size)
        t2 = time.perf_counter()
        fill.append((t1 - t0) * 1e3)
        apply.append((t2 - t1) * 1e3)
    return {"vocab": info.vocab_size, "batch": batch, "fill_threads": FILL_THREADS if batch > 1 else 1, "fill_ms": statistics.median(fill),
            "apply_ms": statistics.median(apply), "total_ms": statistics.median(fill) + statistics.median(apply)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/cpu/grammar.json")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    tiny = tokenizer_info(TINY_ASSETS_DIR, 1000, [0])
    glm = synthetic_info(GLM_VOCAB)
    steps = [step_cost(info, b, args.steps) for info in (tiny, glm) for b in (1, 64)]
    print_table("bitmask cost per decode step (median; fill = every row's mask, apply = masked logits)", steps,
                [("vocab", "vocab", "d"), ("batch", "batch", "d"), ("fill_threads", "threads", "d"), ("fill_ms", "fill ms", ".3f"),
                 ("apply_ms", "apply ms", ".3f"), ("total_ms", "total ms", ".3f")])
    compiles = [{**row, "vocab": name} for name, info in (("tiny 1000", tiny), (f"glm-size {GLM_VOCAB}", glm))
                for row in compile_times(info)]
    print_table("grammar compile time (one compile each, no cache)", compiles,
                [("vocab", "vocab", ""), ("grammar", "grammar", ""), ("compile_ms", "ms", ".1f")])
    write_json(args.out, {"environment": environment(torch.device("cpu")), "arguments": vars(args),
                          "step_cost": steps, "compile": compiles})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
