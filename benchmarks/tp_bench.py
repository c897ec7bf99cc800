"""Tensor parallelism on CPU: weight memory per rank and step time at TP 1 and TP 2, with the share of the
step spent in collectives (all-reduce of each attention and MLP block, the embedding's all-reduce, the
LM head's all-gather).

A mid-size random checkpoint (GLM-4.5-Air's structure, scaled down) is written once in bf16; each rank
loads it through the normal loader, so the TP 2 ranks read only their shards. Per rank it reports the
parameter bytes and the growth of its peak RSS while loading, then times a prefill step (one sequence)
and a decode step (a batch, one token each, over a cached context) in the checkpoint's bf16. Two cores cannot show a TP speed-up (TP 1 with 2 threads uses the same
cores as TP 2 with 1 each); the communication share is the figure that carries over.

    python benchmarks/tp_bench.py            # writes benchmarks/results/cpu/tp_bench.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, print_table, write_json  # noqa: E402

# GLM-4.5-Air's shape (GQA with 4 KV heads, partial RoPE, QK norm off, first layer dense, MoE with a shared
# expert and grouped routing), scaled to ~190M parameters so two ranks and the TP 1 baseline fit here.
MID_SIZE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=4, head_dim=64, moe_intermediate_size=352, n_routed_experts=32,
                num_experts_per_tok=4, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
                use_qk_norm=False, attention_bias=True, max_position_embeddings=4096, dtype="bfloat16",
                num_nextn_predict_layers=0)
VOCAB = 32000


class _CommTimer:
    """Wraps ParallelState's collectives to add up the seconds spent in them (waiting included)."""

    def __init__(self):
        from glmserve.engine.parallel.parallel_state import ParallelState

        self.seconds = 0.0
        for name in ("all_reduce", "all_gather_last_dim"):
            original = getattr(ParallelState, name)

            def timed(st, x, _orig=original):
                t0 = time.perf_counter()
                try:
                    return _orig(st, x)
                finally:
                    self.seconds += time.perf_counter() - t0

            setattr(ParallelState, name, timed)


def _memory() -> dict[str, int]:
    """Resident and peak resident bytes of this process (VmHWM starts afresh at exec, unlike ru_maxrss,
    which a spawned child inherits from its parent)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _rank(rank: int, tp: int, threads: int, port: int, model_dir: str, args, conn) -> None:
    torch.set_num_threads(threads)
    from glmserve.engine.attention.context import SeqChunk, build_context
    from glmserve.engine.attention.torch_backend import TorchAttentionBackend
    from glmserve.engine.kv_cache import allocate_kv_caches, kv_cache_spec
    from glmserve.engine.loader import load_model
    from glmserve.engine.parallel.distributed import init_tensor_parallel
    from glmserve.engine.parallel.parallel_state import ParallelConfig

    timer = _CommTimer()
    if tp > 1:
        init_tensor_parallel(ParallelConfig(tp), rank, f"127.0.0.1:{port}", torch.device("cpu"))
    before = _memory()
    loaded = load_model(model_dir, dtype="bfloat16", device="cpu", backend=TorchAttentionBackend(), show_progress=False)
    after = _memory()
    model, cfg = loaded.model, loaded.config
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bs = 16
    per_seq = -(-(args.context + 1) // bs)
    blocks_needed = max(per_seq * args.batch, -(-args.prefill // bs)) + 1
    caches = allocate_kv_caches(kv_cache_spec(cfg, bs), cfg.num_hidden_layers, blocks_needed, loaded.dtype,
                                torch.device("cpu"))
    g = torch.Generator().manual_seed(0)

    def prefill():
        ctx = build_context([SeqChunk(list(range(1, 1 + -(-args.prefill // bs))), 0, args.prefill)], bs, caches,
                            torch.device("cpu"))
        ids = torch.randint(0, cfg.vocab_size, (args.prefill,), generator=g)
        h = model(ids, ctx.positions, ctx)
        return model.compute_logits(h[-1:])

    def decode():
        seqs = [SeqChunk(list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)), args.context, 1) for i in range(args.batch)]
        ctx = build_context(seqs, bs, caches, torch.device("cpu"))
        ids = torch.randint(0, cfg.vocab_size, (args.batch,), generator=g)
        return model.compute_logits(model(ids, ctx.positions, ctx))

    results = {}
    with torch.inference_mode():
        for name, fn in (("prefill", prefill), ("decode", decode)):
            fn()  # warm-up
            times, comm = [], []
            for _ in range(args.iters):
                c0, t0 = timer.seconds, time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
                comm.append(timer.seconds - c0)
            i = times.index(sorted(times)[len(times) // 2])  # the median run (odd --iters)
            results[name] = {"median_ms": statistics.median(times) * 1e3, "comm_ms": comm[i] * 1e3,
                             "runs_ms": [t * 1e3 for t in times], "comm_runs_ms": [c * 1e3 for c in comm]}
    conn.send({"rank": rank, "param_bytes": param_bytes, "load_rss_growth_bytes": after["VmRSS"] - before["VmRSS"],
               "load_peak_rss_growth_bytes": after["VmHWM"] - before["VmHWM"], "steps": results})


def _run(tp: int, threads: int, model_dir: str, args) -> list[dict]:
    from glmserve.local_ports import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    pipes, procs = [], []
    for rank in range(tp):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_rank, args=(rank, tp, threads, port, model_dir, args, child))
        p.start()
        pipes.append(parent)
        procs.append(p)
    out = [pipe.recv() for pipe in pipes]
    for p in procs:
        p.join()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/cpu/tp_bench.json")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill step")
    p.add_argument("--batch", type=int, default=16, help="sequences of the decode step")
    p.add_argument("--context", type=int, default=256, help="cached tokens of each decoding sequence")
    p.add_argument("--iters", type=int, default=7)
    args = p.parse_args()
    from glmserve.engine.tiny_checkpoint import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        info = write_tiny_checkpoint("glm4_moe", Path(tmp) / "mid", vocab_size=VOCAB, overrides=dict(MID_SIZE))
        model_dir = str(info["model_dir"])
        runs = [("TP 1, 1 thread", 1, 1), ("TP 1, 2 threads", 1, 2), ("TP 2, 1 thread each", 2, 1)]
        rows, raw = [], []
        for label, tp, threads in runs:
            ranks = _run(tp, threads, model_dir, args)
            raw.append({"label": label, "tp": tp, "threads_per_rank": threads, "ranks": ranks})
            r0 = ranks[0]
            for step in ("prefill", "decode"):
                s = r0["steps"][step]
                rows.append({"run": label, "step": step, "ms": s["median_ms"], "comm_ms": s["comm_ms"],
                             "comm_share": s["comm_ms"] / s["median_ms"] if tp > 1 else None,
                             "weights_mib": r0["param_bytes"] / 2**20,
                             "rss_mib": r0["load_rss_growth_bytes"] / 2**20,
                             "hwm_mib": r0["load_peak_rss_growth_bytes"] / 2**20})
    print_table(f"TP on CPU: mid-size GLM-4.5-Air-shaped model ({info['num_params'] / 1e6:.0f}M params, bf16); "
                f"prefill {args.prefill} tokens, decode batch {args.batch} over {args.context} cached; rank 0",
                rows, [("run", "run", ""), ("step", "step", ""), ("ms", "step ms", ".1f"),
                       ("comm_ms", "in collectives ms", ".1f"), ("comm_share", "comm share", ".0%"),
                       ("weights_mib", "weights/rank MiB", ".0f"), ("rss_mib", "RSS growth by loading MiB", ".0f"),
                       ("hwm_mib", "peak RSS growth MiB", ".0f")])
    write_json(args.out, {"benchmark": "tp_bench", "environment": environment(torch.device("cpu")),
                          "config": {**MID_SIZE, "vocab_size": VOCAB, "num_params": info["num_params"],
                                     "prefill_tokens": args.prefill, "decode_batch": args.batch,
                                     "decode_context": args.context, "iters": args.iters},
                          "rows": rows, "raw": raw})


if __name__ == "__main__":
    main()
