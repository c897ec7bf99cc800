"""Decode step of GLM-4.7-Flash (the preset's real config, random "dummy" weights, bf16, one GPU) at batch
1, 8, 64 and 256 with 1k-token contexts, eager and with CUDA graphs, next to the bandwidth floor: the
bytes a step must read (weights it touches + cached KV, roofline.py) over the copy bandwidth measured
in the same run. Targets (issue 5): batch 1 <= 4 ms on an H100; batch 64 within 1.4x of the floor.

One step = ModelRunner.execute of `batch` sequences adding one token each (host preparation, forward,
logits), timed to completion. The same runner and KV cache serve both modes (graphs set aside for eager).

    python benchmarks/decode_bench.py --out benchmarks/results/decode.json
    python benchmarks/decode_bench.py --fp8 --out benchmarks/results/decode_fp8.json   # weights in FP8
"""

from __future__ import annotations

import argparse

import torch

from bench_common import (
    add_common_args, ceilings_then_model, environment, make_chunks, print_table, resolve_device,
    spec_bandwidth_gbps, time_fn, tiny_flash_config, write_json,
)
from roofline import decode_bytes

BATCH1_TARGET_MS = 4.0
BATCH64_TARGET_RATIO = 1.4


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "benchmarks/results/decode.json")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,64,256)")
    p.add_argument("--context", type=int, default=None, help="cached tokens per sequence (default 1024)")
    p.add_argument("--backend", default=None, help="attention backend (default triton: graph-safe)")
    p.add_argument("--no-graphs", action="store_true", help="eager only")
    p.add_argument("--fp8", action="store_true", help="quantize the weights to FP8 (per channel) first")
    p.add_argument("--profile", type=int, default=None, metavar="BATCH",
                   help="also profile 5 steps at this batch size (graph replay when captured) and print the "
                        "kernels that take the most device time (default: no profile)")
    args = p.parse_args(argv)
    device = resolve_device(args, "decode_bench.py")
    from glmserve.engine.config import CacheConfig
    from glmserve.engine.model_runner import ModelRunner
    from glmserve.engine.presets import preset_config

    if args.tiny:
        cfg, default_batches, default_ctx = tiny_flash_config(), "1,2,4", 32
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:  # no MTP layer: decode never runs it, and its weights would only take memory
        cfg, default_batches, default_ctx = preset_config("GLM-4.7-Flash").replace(num_nextn_predict_layers=0), "1,8,64,256", 1024
        dtype = torch.bfloat16
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    ctx, block_size = args.context or default_ctx, 16
    backend_name = args.backend or ("torch" if device.type == "cpu" else "triton")

    ceilings, model, backend, load_s = ceilings_then_model(cfg, device, dtype, backend_name, args)
    pages = -(-(ctx + 1) // block_size)
    runner = ModelRunner(model, cfg, backend, CacheConfig(block_size=block_size, num_blocks=max(batches) * pages + 1),
                         dtype, device, enable_cuda_graph=not args.no_graphs, cuda_graph_max_batch_size=max(batches),
                         max_model_len=ctx + 2 * block_size)
    graph_stats = runner.cuda_graph_stats()
    graphs = runner.graphs

    env = environment(device)
    spec = spec_bandwidth_gbps(env.get("gpu"))
    weight_bytes = 1 if args.fp8 else 2
    rows = []
    for batch in batches:
        chunks = make_chunks(batch, ctx, 1, block_size, cfg.vocab_size, seed=batch)
        need = decode_bytes(cfg, batch, ctx, weight_bytes=weight_bytes)
        floor_ms = need["total"] / (ceilings["copy_gbps"] * 1e9) * 1e3
        for mode in ("eager", "graph"):
            if mode == "graph" and graphs is None:
                rows.append({"batch": batch, "mode": mode, "note": graph_stats.get("reason")})
                continue
            runner.graphs = graphs if mode == "graph" else None
            replays = graphs.num_replays if graphs is not None else 0
            t = time_fn(lambda: runner.execute(chunks), device, args.warmup, args.iters)
            if mode == "graph":  # every timed step must have replayed a graph
                assert graphs.num_replays - replays == args.warmup + args.iters, "decode steps did not replay"
            ms = t["median_ms"]
            row = {"batch": batch, "mode": mode, "context": ctx, "step_ms": ms, "tok_s": batch / ms * 1e3,
                   "bytes_per_step": need["total"], "gb_per_step": need["total"] / 1e9,
                   "weight_bytes": need["weights"], "kv_bytes": need["kv"],
                   "experts_touched_per_layer": need["experts_touched_per_layer"],
                   "floor_ms": floor_ms, "x_floor": ms / floor_ms, "achieved_gbps": need["total"] / (ms * 1e-3) / 1e9,
                   "floor_ms_spec": need["total"] / (spec * 1e9) * 1e3 if spec else None, "runs_ms": t["runs_ms"]}
            if batch == 1:
                row["target"] = f"<= {BATCH1_TARGET_MS} ms"
                row["meets_target"] = ms <= BATCH1_TARGET_MS
            elif batch == 64:
                row["target"] = f"<= {BATCH64_TARGET_RATIO}x floor"
                row["meets_target"] = ms / floor_ms <= BATCH64_TARGET_RATIO
            rows.append(row)
    runner.graphs = graphs
    top_kernels = profile_steps(runner, make_chunks(args.profile, ctx, 1, block_size, cfg.vocab_size, seed=0)) \
        if args.profile else None

    print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, matmul {ceilings['matmul_tflops']:.1f} TFLOP/s; "
          f"model loaded in {load_s:.1f} s; cuda graphs: {graph_stats}")
    title = (f"Decode step, {'tiny config' if args.tiny else 'GLM-4.7-Flash'} "
             f"({'fp8' if args.fp8 else str(dtype).split('.')[-1]}, {backend_name} attention), ctx {ctx}, "
             f"on {env.get('gpu') or env['device']}")
    print_table(title, rows, [
        ("batch", "batch", ""), ("mode", "mode", ""), ("step_ms", "ms/step", ".2f"), ("tok_s", "tok/s", ".0f"),
        ("gb_per_step", "GB/step", ".2f"), ("floor_ms", "floor ms", ".2f"), ("x_floor", "x floor", ".2f"),
        ("floor_ms_spec", "spec floor ms", ".2f"), ("achieved_gbps", "GB/s", ".0f"), ("target", "target", ""),
        ("meets_target", "ok", ""), ("note", "note", "")])
    payload = {"benchmark": "decode", "tiny": args.tiny, "environment": env, "ceilings": ceilings,
               "model": "tiny" if args.tiny else "GLM-4.7-Flash", "dtype": str(dtype), "fp8_weights": args.fp8,
               "attention_backend": backend_name, "kernels": vars(runner.kernels), "context": ctx,
               "cuda_graphs": graph_stats, "load_seconds": load_s, "rows": rows, "profile_batch": args.profile,
               "top_kernels": top_kernels}
    write_json(args.out, payload)
    return payload


def profile_steps(runner, chunks, steps: int = 5, top: int = 15) -> list[dict]:
    """Device time per kernel over `steps` decode steps: where a step's time goes (printed and returned)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    runner.execute(chunks)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner.execute(chunks)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    rows = [{"kernel": e.key[:90], "calls_per_step": e.count / steps, "us_per_step": e.device_time_total / steps}
            for e in events[:top]]
    print(f"\ntop kernels over {steps} steps ({len(chunks)} sequences), device microseconds per step:")
    for r in rows:
        print(f"  {r['us_per_step']:9.1f} us  x{r['calls_per_step']:<5.0f} {r['kernel']}")
    return rows


if __name__ == "__main__":
    main()
