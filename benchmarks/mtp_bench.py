"""MTP speculative decoding on CPU, on the tiny checkpoint whose target and MTP layer are trained
(tests/engine/trained_mtp_model.py): acceptance for k = 1..4 and decode tokens/s with and without MTP.

    .venv/bin/python benchmarks/mtp_bench.py --out benchmarks/results/cpu/mtp.json

Acceptance: greedy generation for a batch of prompts (stretches of the training cycle); mean acceptance
length = tokens per verify pass (accepted drafts + the target's own), vLLM's definition; per-position
acceptance = verify passes whose draft i was accepted / verify passes. Steps near max_tokens propose fewer
than k drafts and count as passes too, so the last positions read slightly low.

Decode tokens/s: the offline engine steps every request to its first token (prefill, untimed), then the
remaining steps are timed; tokens/s = tokens they produced / their seconds; the median of --repeats runs,
the engines of every k taking turns within each repeat (a shared CPU's load drifts).

The checkpoint has --layers target layers (default 8) and one MTP layer. The MTP layer costs about what
one target layer costs, so the target's depth sets how much of a step drafting takes: 1 in 9 here, 1 in 48
on GLM-4.7-Flash. The tests train the same corpus with 3 target layers (quicker).
Targets (issue 10): mean acceptance length >= 2.5 at k = 3; batch-1 decode >= 1.8x faster with MTP.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import REPO, environment, print_table, write_json

sys.path.insert(0, str(REPO))

from glmserve import LLM, SamplingParams  # noqa: E402
from tests.engine.trained_mtp_model import cycle_tokens, cycle_window, train_mtp_model  # noqa: E402

ACCEPTANCE_TARGET_K3 = 2.5
SPEEDUP_TARGET_BATCH1 = 1.8


def _prompts(n: int, prompt_len: int) -> list[list[int]]:
    cycle = cycle_tokens()
    return [cycle_window(cycle, (i * 37) % len(cycle), prompt_len) for i in range(n)]


def _llm(model_dir: Path, k: int) -> LLM:
    spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
    return LLM(str(model_dir), dtype="float32", show_progress=False, speculative_config=spec)


def acceptance(model_dir: Path, k: int, prompts, new_tokens: int) -> dict:
    llm = _llm(model_dir, k)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    s = llm.engine.speculator.stats
    return {"k": k, "num_drafts": s.num_drafts, "num_draft_tokens": s.num_draft_tokens,
            "num_accepted_tokens": s.num_accepted_tokens, "mean_acceptance_length": s.mean_acceptance_length,
            "per_position": [n / s.num_drafts for n in s.accepted_per_position],
            "draft_acceptance_rate": s.num_accepted_tokens / s.num_draft_tokens}


def decode_run(llm: LLM, prompts, new_tokens: int, tag: str) -> tuple[int, float, int]:
    """(tokens after the first, seconds, engine steps) of one batch, prefill excluded."""
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}-{i}", p, params)
    while any(r.num_output_tokens == 0 for r in eng.requests.values()):
        eng.step()
    start_tokens = sum(r.num_output_tokens for r in eng.requests.values())
    tokens, steps = 0, 0
    t0 = time.perf_counter()
    while eng.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in eng.step())
        steps += 1
    seconds = time.perf_counter() - t0
    assert tokens + start_tokens == new_tokens * len(prompts)
    return tokens, seconds, steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/cpu/mtp.json")
    p.add_argument("--model-dir", default=None, help="a trained checkpoint to reuse (default: train one, ~1 min)")
    p.add_argument("--batches", default="1,16", help="decode batch sizes (default 1,16)")
    p.add_argument("--ks", default="1,2,3,4", help="drafts per step to measure (default 1,2,3,4)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48, help="per request (prompt + new stay within training)")
    p.add_argument("--repeats", type=int, default=3, help="decode runs per row (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady on a shared CPU)")
    p.add_argument("--layers", type=int, default=8, help="target layers of the trained checkpoint (default 8)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    ks = [int(k) for k in args.ks.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_dir = (Path(args.model_dir) if args.model_dir
                     else train_mtp_model(Path(tmp) / "model", num_layers=args.layers))
        train_s = time.perf_counter() - t0
        train_info = (model_dir / "train_info.json").read_text() if (model_dir / "train_info.json").exists() else None
        layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]

        acc_rows = [acceptance(model_dir, k, _prompts(16, args.prompt_len), args.new_tokens) for k in ks]
        for r in acc_rows:
            r["per_position_text"] = " ".join(f"{x:.2f}" for x in r["per_position"])
            if r["k"] == 3:
                r["target"], r["meets_target"] = f">= {ACCEPTANCE_TARGET_K3}", r["mean_acceptance_length"] >= ACCEPTANCE_TARGET_K3

        speed_rows = []
        llms = {k: _llm(model_dir, k) for k in [0] + ks}
        for llm in llms.values():
            decode_run(llm, _prompts(1, args.prompt_len), 4, "warmup")
        for batch in batches:
            prompts = _prompts(batch, args.prompt_len)
            base = None
            all_runs: dict[int, list] = {k: [] for k in llms}
            for i in range(args.repeats):
                for k, llm in llms.items():
                    all_runs[k].append(decode_run(llm, prompts, args.new_tokens, f"b{batch}r{i}"))
            for k in llms:
                runs = all_runs[k]
                tok_s = statistics.median(t / s for t, s, _ in runs)
                steps = runs[0][2]
                row = {"batch": batch, "k": k, "tokens_per_s": tok_s, "steps": steps,
                       "ms_per_step": statistics.median(s / n * 1e3 for _, s, n in runs),
                       "runs_tok_s": [t / s for t, s, _ in runs]}
                if k == 0:
                    base = tok_s
                row["speedup"] = tok_s / base
                if batch == 1 and k:
                    row["target"] = f">= {SPEEDUP_TARGET_BATCH1}x"
                    row["meets_target"] = row["speedup"] >= SPEEDUP_TARGET_BATCH1
                speed_rows.append(row)

    threads = torch.get_num_threads()
    print_table(f"MTP acceptance, trained tiny glm4_moe, batch 16, {args.new_tokens} new tokens", acc_rows, [
        ("k", "k", ""), ("num_drafts", "passes", ""), ("mean_acceptance_length", "mean acc len", ".2f"),
        ("draft_acceptance_rate", "draft acc", ".2f"), ("per_position_text", "per position", ""),
        ("target", "target", ""), ("meets_target", "ok", "")])
    print_table(f"Decode tokens/s (prefill excluded), CPU, {threads} thread(s)", speed_rows, [
        ("batch", "batch", ""), ("k", "k", ""), ("tokens_per_s", "tok/s", ".0f"), ("steps", "steps", ""),
        ("ms_per_step", "ms/step", ".2f"), ("speedup", "x no-MTP", ".2f"), ("target", "target", ""),
        ("meets_target", "ok", "")])
    payload = {"benchmark": "mtp_cpu", "environment": environment(torch.device("cpu")), "arguments": vars(args),
               "checkpoint": f"tiny glm4_moe, {layers} target layers + 1 MTP layer, trained",
               "threads": threads, "train_seconds": train_s, "train_info": train_info,
               "acceptance": acc_rows, "decode": speed_rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
