"""MTP speculative decoding step of GLM-4.7-Flash (the preset's real config with its MTP layer, random
"dummy" weights, bf16, one GPU) at batch 1 and 64 with 1k-token contexts, k = 0 (plain decode), 1 and 3
drafts, eager and with CUDA graphs, next to the bandwidth floor (roofline.py).

One step with k drafts = the target's verify forward over [last token + k drafts] of every sequence, the
logits of all k + 1 positions and their argmax on the host (what acceptance reads), then drafting: the MTP
layer over the k + 1 positions and k - 1 chained one-token steps with their argmax on the host
(spec_decode/graphs.py; eager = the same function run without a graph). k = 0 is ModelRunner.execute of a
plain decode step plus its argmax.

Random weights accept nothing, so acceptance is a parameter: a step emits a tokens when a - 1 drafts are
accepted (1 <= a <= k + 1). The table gives the step time and, for each a, the time per output token
(step / a) and the speed-up over k = 0 in the same mode (a x step(k=0) / step(k)).

    python benchmarks/mtp_gpu_bench.py --out benchmarks/results/mtp_gpu.json
    python benchmarks/mtp_gpu_bench.py --device cpu --tiny --out /tmp/mtp_gpu.json   # smoke run
"""

from __future__ import annotations

import argparse

import torch

from bench_common import (
    add_common_args, ceilings_then_model, environment, make_chunks, print_table, resolve_device, time_fn,
    tiny_flash_config, write_json,
)
from roofline import decode_bytes, spec_step_bytes

BLOCK_SIZE = 16


def _seqs(batch: int, ctx: int, k: int, pages: int):
    """Each sequence's verify chunk: ctx cached tokens, k + 1 new ones, on disjoint blocks (block 0 free)."""
    from glmserve.engine.attention.context import SeqChunk

    return [SeqChunk(list(range(1 + i * pages, 1 + (i + 1) * pages)), ctx, k + 1) for i in range(batch)]


class SpecStep:
    """Verify + draft of one batch, replayed from the graphs or run eagerly over the same static buffers."""

    def __init__(self, model, graphs, batch: int, ctx: int, k: int, pages: int, vocab: int, use_graphs: bool):
        g = torch.Generator().manual_seed(batch * 10 + k)
        self.model, self.graphs, self.batch, self.k, self.use_graphs = model, graphs, batch, k, use_graphs
        self.seqs = _seqs(batch, ctx, k, pages)
        self.ids = torch.randint(0, vocab, (batch * (k + 1),), generator=g).tolist()
        self.mtp_ids = torch.randint(0, vocab, (batch * (k + 1),), generator=g).tolist()
        self.accepted = [k] * batch  # drafting cost does not depend on it (the pass covers all k + 1 rows)
        self.hidden = None

    def _eager(self, runner, bucket: int):
        ctx = runner.inputs.context(bucket, runner.kv_caches, runner.host_seq_len)
        return runner._forward(bucket, ctx)

    def verify(self):
        v = self.graphs.verify
        if self.use_graphs:
            hidden = v.run(self.ids, self.seqs)
        else:
            v.inputs.fill(self.ids, self.seqs, self.batch)
            hidden = self._eager(v, self.batch)
        tokens = self.model.compute_logits(hidden).argmax(dim=-1).tolist()  # every row is a verify position
        self.hidden = hidden
        return tokens

    def draft(self):
        d = self.graphs.draft
        if self.hidden is None:
            self.verify()
        if self.use_graphs:
            return d.draft(self.seqs, self.mtp_ids, self.hidden, self.accepted)
        d.fill_drafts(self.seqs, self.mtp_ids, self.hidden, self.accepted, self.batch)
        return self._eager(d, self.batch).tolist()

    def step(self):
        self.verify()
        return self.draft()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "benchmarks/results/mtp_gpu.json")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--ks", default="0,1,3", help="drafts per step to measure (0 = plain decode; default 0,1,3)")
    p.add_argument("--context", type=int, default=None, help="cached tokens per sequence (default 1024)")
    p.add_argument("--no-graphs", action="store_true", help="eager only")
    args = p.parse_args(argv)
    device = resolve_device(args, "mtp_gpu_bench.py")
    from glmserve.engine.config import CacheConfig
    from glmserve.engine.cuda_graphs import graph_unsafe_reason
    from glmserve.engine.model_runner import ModelRunner
    from glmserve.engine.presets import preset_config
    from glmserve.engine.spec_decode.graphs import SpecDecodeGraphs

    if args.tiny:
        cfg, default_batches, default_ctx = tiny_flash_config().replace(num_nextn_predict_layers=1), "1,2", 32
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:
        cfg, default_batches, default_ctx = preset_config("GLM-4.7-Flash"), "1,64", 1024
        dtype = torch.bfloat16
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    if any(not 0 <= k <= 4 for k in ks):
        p.error("--ks: each k must be in 0..4")
    ctx = args.context or default_ctx
    k_max = max(ks)
    max_model_len = ctx + 2 * BLOCK_SIZE + 2 * k_max
    pages = -(-(ctx + 2 * k_max + 1) // BLOCK_SIZE)
    # Triton attention everywhere (graph-safe; on CPU under the interpreter: host lengths only size launches).
    ceilings, model, backend, load_s = ceilings_then_model(cfg, device, dtype, "triton", args, with_mtp=True)
    runner = ModelRunner(model, cfg, backend, CacheConfig(block_size=BLOCK_SIZE, num_blocks=max(batches) * pages + 1),
                         dtype, device, enable_cuda_graph=not args.no_graphs and 0 in ks,
                         cuda_graph_max_batch_size=max(batches), max_model_len=max_model_len,
                         cuda_graph_capture_sizes=tuple(batches), extra_kv_layers=1, num_lookahead_tokens=k_max)
    plain_graphs = runner.graphs
    spec_graphs, capture = {}, {"k=0": runner.cuda_graph_stats()}
    reason = "disabled (--no-graphs)" if args.no_graphs else None
    for k in (k for k in ks if k > 0):
        spec_graphs[k] = SpecDecodeGraphs(model, runner.kv_caches, BLOCK_SIZE, k, max(batches), max_model_len,
                                          device, dtype, capture_sizes=tuple(batches))
        why = reason or graph_unsafe_reason(model, backend, device, tokens_per_seq=k + 1)
        if why is None:
            spec_graphs[k].capture()
            capture[f"k={k}"] = spec_graphs[k].stats()
        else:
            capture[f"k={k}"] = {"enabled": False, "reason": why}

    env = environment(device)
    rows = []
    base_ms: dict[tuple[int, str], float] = {}
    for batch in batches:
        for k in ks:
            for mode in ("eager", "graph"):
                row = {"batch": batch, "k": k, "mode": mode, "context": ctx}
                if mode == "graph" and not capture[f"k={k}"].get("enabled"):
                    rows.append({**row, "note": capture[f"k={k}"].get("reason")})
                    continue
                if k == 0:
                    chunks = make_chunks(batch, ctx, 1, BLOCK_SIZE, cfg.vocab_size, seed=batch)
                    runner.graphs = plain_graphs if mode == "graph" else None

                    def plain_step():
                        return runner.execute(chunks).logits.argmax(dim=-1).tolist()

                    t = time_fn(plain_step, device, args.warmup, args.iters)
                    row.update(step_ms=t["median_ms"], verify_ms=t["median_ms"], draft_ms=0.0, runs_ms=t["runs_ms"])
                    need = decode_bytes(cfg, batch, ctx)
                    floor_bytes, draft_bytes = need["total"], 0.0
                else:
                    s = SpecStep(model, spec_graphs[k], batch, ctx, k, pages, cfg.vocab_size, mode == "graph")
                    tv = time_fn(s.verify, device, args.warmup, args.iters)
                    td = time_fn(s.draft, device, args.warmup, args.iters)
                    t = time_fn(s.step, device, args.warmup, args.iters)
                    row.update(step_ms=t["median_ms"], verify_ms=tv["median_ms"], draft_ms=td["median_ms"],
                               runs_ms=t["runs_ms"])
                    need = spec_step_bytes(cfg, batch, ctx, k)
                    floor_bytes, draft_bytes = need["total"], need["draft"]
                ms = row["step_ms"]
                floor_ms = floor_bytes / (ceilings["copy_gbps"] * 1e9) * 1e3
                row.update(gb_per_step=floor_bytes / 1e9, draft_gb=draft_bytes / 1e9, floor_ms=floor_ms,
                           x_floor=ms / floor_ms)
                if k == 0:
                    base_ms[(batch, mode)] = ms
                base = base_ms.get((batch, mode))
                # a tokens per step (a - 1 accepted drafts): time per token, speed-up over plain decode
                row["tpot_ms_at"] = {a: ms / a for a in range(1, k + 2)}
                row["floor_tpot_ms_at"] = {a: floor_ms / a for a in range(1, k + 2)}
                if base is not None:
                    row["speedup_at"] = {a: a * base / ms for a in range(1, k + 2)}
                    for a in range(1, k + 2):
                        row[f"x{a}"] = row["speedup_at"][a]
                row["tpot_full_ms"] = ms / (k + 1)
                rows.append(row)
    runner.graphs = plain_graphs

    print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, matmul {ceilings['matmul_tflops']:.1f} TFLOP/s; "
          f"model loaded in {load_s:.1f} s; cuda graphs: {capture}")
    title = (f"MTP speculative step, {'tiny config' if args.tiny else 'GLM-4.7-Flash'} "
             f"({str(dtype).split('.')[-1]}, triton attention), ctx {ctx}, on {env.get('gpu') or env['device']}; "
             f"xA = speed-up over k=0 (same mode) if A tokens came out per step")
    print_table(title, rows, [
        ("batch", "batch", ""), ("k", "k", ""), ("mode", "mode", ""), ("verify_ms", "verify ms", ".2f"),
        ("draft_ms", "draft ms", ".2f"), ("step_ms", "step ms", ".2f"), ("floor_ms", "floor ms", ".2f"),
        ("x_floor", "x floor", ".2f"), ("tpot_full_ms", "TPOT@k+1 ms", ".2f"), ("x1", "x1", ".2f"),
        ("x2", "x2", ".2f"), ("x3", "x3", ".2f"), ("x4", "x4", ".2f"), ("note", "note", "")])
    payload = {"benchmark": "mtp_gpu", "tiny": args.tiny, "environment": env, "ceilings": ceilings,
               "model": "tiny" if args.tiny else "GLM-4.7-Flash", "dtype": str(dtype), "attention_backend": "triton",
               "kernels": vars(runner.kernels), "context": ctx, "cuda_graphs": capture, "load_seconds": load_s,
               "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
