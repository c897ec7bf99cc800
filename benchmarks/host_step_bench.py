"""Host time per decode step: everything the engine does outside the model forward (scheduling, step
metadata, sampling, output processing), at 1 / 64 / 256 running sequences with 1k and 8k-token contexts.

    .venv/bin/python benchmarks/host_step_bench.py --out benchmarks/results/cpu/host_step_after.json

How the model is stubbed: the engine is built from the built-in tiny model's config (1 layer, 1 KV head
of 8 dims so 256 x 8k tokens of paged cache fit in ~140 MB) and a `LoadedModel` whose module is
`StubModel` below. `StubModel.forward(input_ids, positions, ctx)` returns zeros [T, hidden] and
`compute_logits(rows)` returns one fixed logits row (a non-EOS token wins greedy sampling) repeated, as a
contiguous [rows, V] tensor like a real lm_head's (the sampler's argmax over a stride-0 view was ~1.7x
slower, which no model would show); both
record the seconds spent inside them. Its attention backend `NoAttention` plans nothing (prepare() is a
no-op), so attention planning, which is the backend's business, is not counted. Everything else (LLMEngine.add_request / step, the scheduler, the
block pool with prefix caching, ModelRunner.execute building its ForwardContext, the sampler) is the
real code. Host time of a step = wall time of `LLMEngine.step()` minus the time inside the stub. On a
shared machine wall time also counts the time other processes held the core, so the same is measured in
this thread's CPU time too (`host cpu ms`; on a quiet machine the two agree).

Each row: add N requests whose prompts are `ctx` distinct random tokens (no prefix hits between them),
step until every request has its first token (prefill, not timed). Every row's engine is built and
prefilled first; then `--rounds` rounds each time a burst of every row in turn (1k, 8k, 1k, 8k, ... per
sequence count): `--warmup` untimed steps (the caches were the other engine's), then `--iters` timed
decode steps. On a shared VM the load drifts within minutes, and rows timed one after another would
compare different moments; alternating short bursts puts every row under the same mix of quiet and busy
moments. A row reports the median and min over all its timed steps, and the medians' ratio to its
shortest context; the JSON keeps every step's figure, per round.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import time

import torch
from bench_common import environment, print_table, write_json
from torch import nn

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.engine import LLMEngine
from glmserve.engine.llm import resolve_model
from glmserve.engine.loader import LoadedModel, read_model_config
from glmserve.engine.sampling_params import SamplingParams


class NoAttention(AttentionBackend):
    """The stub's backend: prepare() (per-step planning) is a no-op, as a GPU backend's would be cheap;
    the stub never calls attention."""

    name = "none"

    def gqa(self, *args):
        raise AssertionError("the stub model does no attention")

    mla = gqa


class StubModel(nn.Module):
    """Stands in for the GLM model: fixed outputs, and a clock of the time spent in it."""

    def __init__(self, hidden_size: int, vocab_size: int, winner: int):
        super().__init__()
        self.backend = NoAttention()
        self.hidden_size = hidden_size
        self.logits = torch.zeros(vocab_size)
        self.logits[winner] = 1.0
        # [wall seconds, this thread's CPU seconds] inside the stub. A plain list: nn.Module.__setattr__ takes
        # microseconds, which would land outside the stub's clock and count as host time.
        self.clock = [0.0, 0.0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        t0, c0 = time.perf_counter(), time.thread_time()
        out = torch.zeros(input_ids.shape[0], self.hidden_size)
        self._tick(t0, c0)
        return out

    def compute_logits(self, rows: torch.Tensor) -> torch.Tensor:
        t0, c0 = time.perf_counter(), time.thread_time()
        out = self.logits.expand(rows.shape[0], -1).contiguous()  # a real lm_head's output is contiguous
        self._tick(t0, c0)
        return out

    def _tick(self, t0: float, c0: float) -> None:
        t1, c1 = time.perf_counter(), time.thread_time()
        clock = self.clock
        clock[0] += t1 - t0
        clock[1] += c1 - c0


def build_engine(num_seqs: int, ctx_len: int, extra_tokens: int) -> tuple[LLMEngine, StubModel]:
    model_dir = resolve_model(None)
    block_size = CacheConfig().block_size
    max_len = ctx_len + extra_tokens + block_size
    cfg = read_model_config(model_dir).replace(num_hidden_layers=1, num_key_value_heads=1, head_dim=8,
                                                max_position_embeddings=max_len)
    winner = next(t for t in range(cfg.vocab_size) if t not in cfg.eos_token_ids)
    stub = StubModel(cfg.hidden_size, cfg.vocab_size, winner)
    blocks = num_seqs * -(-max_len // block_size) + 16
    engine_cfg = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", enable_cuda_graph=False,
                              cache=CacheConfig(num_blocks=blocks),
                              scheduler=SchedulerConfig(max_num_seqs=max(num_seqs, 1), max_model_len=max_len),
                              show_progress=False)
    loaded = LoadedModel(model=stub, config=cfg, model_dir=model_dir, dtype=torch.float32,
                         device=torch.device("cpu"))
    return LLMEngine(engine_cfg, loaded), stub


class Row:
    """One (sequences, context) engine, prefilled and ready to decode; `burst` times steps of it."""

    def __init__(self, num_seqs: int, ctx_len: int, decode_steps: int, seed: int):
        # Early requests decode while later ones prefill: room for those steps too, so none finishes early.
        prefill_steps = -(-num_seqs * ctx_len // SchedulerConfig().max_num_batched_tokens) + 2
        max_tokens = prefill_steps + decode_steps + 4
        self.num_seqs, self.ctx_len = num_seqs, ctx_len
        self.engine, self.stub = build_engine(num_seqs, ctx_len, max_tokens)
        rng = random.Random(seed)
        vocab = self.engine.model_config.vocab_size
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        for i in range(num_seqs):
            self.engine.add_request(f"r{i}", [rng.randrange(vocab) for _ in range(ctx_len)], params)
        started = set()
        t0 = time.perf_counter()
        while len(started) < num_seqs:  # prefill (untimed): every request gets its first token
            started.update(o.request_id for o in self.engine.step())
        self.prefill_s = time.perf_counter() - t0
        self.rounds: list[dict[str, list[float]]] = []

    def burst(self, warmup: int, iters: int) -> None:
        """`warmup` untimed decode steps, then `iters` timed ones, kept as one more round."""
        engine, stub = self.engine, self.stub
        fig: dict[str, list[float]] = {"host_ms": [], "step_ms": [], "host_cpu_ms": []}
        for i in range(warmup + iters):
            stub.clock[:] = (0.0, 0.0)
            t0, c0 = time.perf_counter(), time.thread_time()
            out = engine.step()
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            if len(out) != self.num_seqs or any(o.finished for o in out):
                raise RuntimeError(f"decode step produced {len(out)} outputs for {self.num_seqs} running sequences")
            if i >= warmup:
                fig["host_ms"].append((wall - stub.clock[0]) * 1e3)
                fig["step_ms"].append(wall * 1e3)
                fig["host_cpu_ms"].append((cpu - stub.clock[1]) * 1e3)
        self.rounds.append(fig)

    def result(self) -> dict:
        def every(key: str) -> list[float]:
            return [t for fig in self.rounds for t in fig[key]]

        host, cpu = every("host_ms"), every("host_cpu_ms")
        return {"num_seqs": self.num_seqs, "context": self.ctx_len, "host_ms_median": statistics.median(host),
                "host_ms_min": min(host), "host_ms_mean": statistics.fmean(host),
                "step_ms_median": statistics.median(every("step_ms")), "prefill_s": self.prefill_s,
                "host_cpu_ms_median": statistics.median(cpu), "host_ms_runs": host, "host_cpu_ms_runs": cpu,
                "host_ms_round_medians": [statistics.median(f["host_ms"]) for f in self.rounds],
                "rounds": self.rounds}


def rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="1,64,256", help="running sequences per row (comma list)")
    p.add_argument("--contexts", default="1024,8192", help="context lengths in tokens (comma list)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps before each burst")
    p.add_argument("--iters", type=int, default=20, help="timed decode steps per row per round")
    p.add_argument("--rounds", type=int, default=5, help="bursts per row, taken round-robin across the rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="free text saved in the JSON (e.g. before / after)")
    p.add_argument("--out", default="benchmarks/results/cpu/host_step.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    contexts, seqs = [int(x) for x in args.contexts.split(",")], [int(x) for x in args.seqs.split(",")]
    decode_steps = args.rounds * (args.warmup + args.iters)
    engines = {}
    for ctx_len in contexts:
        for n in seqs:
            engines[n, ctx_len] = Row(n, ctx_len, decode_steps, args.seed)
            print(f"  built and prefilled: {n} seqs x {ctx_len} tokens (peak RSS {rss_mib():.0f} MiB)", flush=True)
    for r in range(args.rounds):  # round-robin bursts: each sequence count's contexts back to back
        for n in seqs:
            for ctx_len in contexts:
                engines[n, ctx_len].burst(args.warmup, args.iters)
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    rows = [engines[n, c].result() for c in contexts for n in seqs]
    for key, ratio in (("host_ms_median", "x_vs_shortest_context"), ("host_cpu_ms_median", "cpu_x_vs_shortest_context")):
        by_key = {(r["num_seqs"], r["context"]): r[key] for r in rows}
        for r in rows:
            base = by_key.get((r["num_seqs"], min(c for (n, c) in by_key if n == r["num_seqs"])))
            r[ratio] = r[key] / base if base else None
    for r in rows:  # the same ratio within each round: how much of it is drift
        base = engines[r["num_seqs"], min(contexts)].result()["host_ms_round_medians"]
        r["x_vs_shortest_context_per_round"] = [m / b for m, b in zip(r["host_ms_round_medians"], base)]
    print_table("host time per decode step (stub model; ms outside the forward)", rows,
                [("num_seqs", "seqs", "d"), ("context", "context", "d"), ("host_ms_median", "host ms", ".3f"),
                 ("host_ms_min", "min ms", ".3f"), ("x_vs_shortest_context", "x vs 1k", ".2f"),
                 ("step_ms_median", "step ms", ".3f"), ("host_cpu_ms_median", "host cpu ms", ".3f"),
                 ("cpu_x_vs_shortest_context", "cpu x vs 1k", ".2f")])
    for r in rows:
        if r["context"] != min(contexts):
            print(f"  {r['num_seqs']} seqs, {r['context']} vs {min(contexts)} per round: "
                  + " ".join(f"{x:.2f}" for x in r["x_vs_shortest_context_per_round"]))
    print(f"  peak RSS {rss_mib():.0f} MiB")
    write_json(args.out, {"environment": environment(torch.device("cpu")), "arguments": vars(args),
                          "targets": {"flat_in_context": "8k within 1.2x of 1k", "ms_at_256_seqs": 2.0},
                          "peak_rss_mib": rss_mib(), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
