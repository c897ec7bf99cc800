"""Re-measure issue 13's fault table: `glmserve up --prefill 1 --decode 2` under steady streaming load,
then SIGKILL a decode worker, SIGKILL the prefill worker, SIGSTOP a decode worker; per fault: requests in
flight, failed, wrong (tokens differing from the undisturbed run), time until the router routes to every
worker again, and the longest time without a completed request. Prints a table, writes JSON.

    .venv/bin/python benchmarks/fault_table.py [--clients 16] [--sigstop-s 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import environment, print_table, write_json  # noqa: E402
from tests.serving.deployment import Deployment  # noqa: E402
from tests.serving.fault_load import Load, default_specs, run_fault_sequence, wait_kv_idle  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--settle-s", type=float, default=5.0, help="steady load before and after each fault")
    p.add_argument("--sigstop-s", type=float, default=20.0)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/cpu/fault_table.json"))
    args = p.parse_args()

    from glmserve.engine.tiny_model import build_tiny_model

    model = build_tiny_model("glm4_moe", Path(tempfile.mkdtemp()) / "model", seed=3)
    started = time.monotonic()
    with Deployment(model, prefill=1, decode=2, extra_args=("--dtype", "float32")) as dep:
        async def scenario():
            load = Load(dep.base_url, default_specs(8, args.max_tokens), clients=args.clients)
            await load.record_reference()
            rows = await run_fault_sequence(dep, load, settle_s=args.settle_s, sigstop_s=args.sigstop_s)
            idle = await wait_kv_idle(dep.base_url, timeout=30)
            return load, rows, idle

        load, rows, idle = asyncio.run(scenario())
        migrated = dep.log.count("resuming after")
        restarts = [line for line in dep.log.splitlines() if " restarted (pid " in line]
    table = [{**asdict(r), "errors": "; ".join(r.errors)} for r in rows]
    print_table(f"faults under {args.clients} streaming clients (tiny model, CPU)", table, [
        ("fault", "fault", ""), ("requests", "requests", "d"), ("failed", "failed", "d"),
        ("mismatched", "wrong tokens", "d"), ("back_in_pool_s", "back in pool s", ".1f"),
        ("longest_stall_s", "longest stall s", ".1f")])
    total = len(load.outcomes)
    print(f"\n{total} requests in all, {sum(1 for o in load.outcomes if o.error)} failed, "
          f"{len(load.mismatched(load.outcomes))} with wrong tokens; {migrated} streams resumed on another worker; "
          f"{len(restarts)} worker restarts; KV usage after the load: "
          + ", ".join(f"{k} {(v['load'] or {}).get('kv_usage', 0)}" for k, v in idle.items()))
    write_json(args.out, {
        "environment": environment(torch.device("cpu")), "arguments": vars(args), "rows": [asdict(r) for r in rows],
        "total_requests": total, "total_failed": sum(1 for o in load.outcomes if o.error),
        "total_wrong_tokens": len(load.mismatched(load.outcomes)), "streams_resumed": migrated,
        "restarts": restarts, "kv_after": {k: (v["load"] or {}).get("kv_usage", 0) for k, v in idle.items()},
        "wall_s": round(time.monotonic() - started, 1),
    })
    return 0 if all(r.failed == 0 and r.mismatched == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
