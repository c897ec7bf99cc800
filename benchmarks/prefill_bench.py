"""Prefill of GLM-4.7-Flash (preset config, dummy weights, bf16, one GPU) in 1k- and 8k-token chunks,
next to the compute floor: the step's FLOPs (2 x weights each token multiplies + causal attention on
MLA's absorbed path, roofline.py) over the bf16 matmul rate measured in the same run. Target (issue 5):
at least 50% of the measured matmul rate.

One step = ModelRunner.execute of one sequence's `chunk` new tokens from an empty cache (logits for the
last token only), timed to completion.

    python benchmarks/prefill_bench.py --out benchmarks/results/prefill.json
"""

from __future__ import annotations

import argparse

import torch

from bench_common import (
    add_common_args, ceilings_then_model, environment, make_chunks, print_table, resolve_device, time_fn,
    tiny_flash_config, write_json,
)
from roofline import prefill_flops

TARGET_PCT_OF_MATMUL = 50.0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "benchmarks/results/prefill.json")
    p.add_argument("--chunks", default=None, help="comma-separated chunk sizes (default 1024,8192)")
    p.add_argument("--backend", default=None, help="attention backend (default auto: fa3 > flashinfer > triton)")
    p.add_argument("--fp8", action="store_true", help="quantize the weights to FP8 (per channel) first")
    args = p.parse_args(argv)
    device = resolve_device(args, "prefill_bench.py")
    from glmserve.engine.attention import registry
    from glmserve.engine.config import CacheConfig
    from glmserve.engine.model_runner import ModelRunner
    from glmserve.engine.presets import preset_config

    if args.tiny:
        cfg, default_chunks = tiny_flash_config(), "16,64"
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:
        cfg, default_chunks = preset_config("GLM-4.7-Flash").replace(num_nextn_predict_layers=0), "1024,8192"
        dtype = torch.bfloat16
    chunk_sizes = [int(c) for c in (args.chunks or default_chunks).split(",")]
    backend_name = registry.resolve(args.backend or "auto", device)
    block_size = 16

    ceilings, model, backend, load_s = ceilings_then_model(cfg, device, dtype, backend_name, args)
    pages = -(-max(chunk_sizes) // block_size)
    runner = ModelRunner(model, cfg, backend, CacheConfig(block_size=block_size, num_blocks=pages + 1), dtype, device)

    env = environment(device)
    rate = ceilings["fp8_matmul_tflops"] if args.fp8 and ceilings["fp8_matmul_tflops"] else ceilings["matmul_tflops"]
    rows = []
    for chunk in chunk_sizes:
        chunks = make_chunks(1, 0, chunk, block_size, cfg.vocab_size, seed=chunk)
        flops = prefill_flops(cfg, chunk)
        t = time_fn(lambda: runner.execute(chunks), device, args.warmup, args.iters)
        ms = t["median_ms"]
        achieved = flops["total"] / (ms * 1e-3) / 1e12
        rows.append({
            "chunk": chunk, "step_ms": ms, "tok_s": chunk / ms * 1e3, "flops": flops["total"],
            "linear_flops": flops["linear"], "attention_flops": flops["attention"],
            "gflop_per_token": flops["total"] / chunk / 1e9, "achieved_tflops": achieved,
            "floor_ms": flops["total"] / (rate * 1e12) * 1e3, "pct_of_matmul": 100 * achieved / rate,
            "target": f">= {TARGET_PCT_OF_MATMUL:.0f}% of matmul", "meets_target": 100 * achieved / rate >= TARGET_PCT_OF_MATMUL,
            "runs_ms": t["runs_ms"]})

    print(f"ceilings: matmul {ceilings['matmul_tflops']:.1f} TFLOP/s"
          + (f", fp8 {ceilings['fp8_matmul_tflops']:.1f}" if ceilings["fp8_matmul_tflops"] else "")
          + f"; model loaded in {load_s:.1f} s")
    title = (f"Prefill, {'tiny config' if args.tiny else 'GLM-4.7-Flash'} "
             f"({'fp8' if args.fp8 else str(dtype).split('.')[-1]}, {backend_name} attention) "
             f"on {env.get('gpu') or env['device']}")
    print_table(title, rows, [
        ("chunk", "chunk", ""), ("step_ms", "ms", ".2f"), ("tok_s", "tok/s", ".0f"), ("gflop_per_token", "GFLOP/tok", ".2f"),
        ("achieved_tflops", "TFLOP/s", ".1f"), ("floor_ms", "floor ms", ".2f"), ("pct_of_matmul", "% matmul", ".0f"),
        ("target", "target", ""), ("meets_target", "ok", "")])
    payload = {"benchmark": "prefill", "tiny": args.tiny, "environment": env, "ceilings": ceilings,
               "model": "tiny" if args.tiny else "GLM-4.7-Flash", "dtype": str(dtype), "fp8_weights": args.fp8,
               "attention_backend": backend_name, "kernels": vars(runner.kernels), "load_seconds": load_s, "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
