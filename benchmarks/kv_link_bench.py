"""KV link throughput next to raw ProcessGroupGloo send/recv between the same two processes.

This process is the decode worker D (KVLinkServer + receiver); a spawned child is the prefill worker P.
For each scenario P sends one transfer of `layers` messages (one per layer, `tokens` tokens each, as
layer-wise prefill does), gathered from P's paged cache and scattered into D's. Then the same two
processes move the same bytes in the same message sizes over a bare ProcessGroupGloo (no header, no
gather/scatter) and, as a ceiling, in messages of about 64 MiB. Both caches hold the transfer in
consecutive blocks, so whole blocks land straight in D's cache. `kv_link` is what the prefill worker
does: it sends whole blocks straight from P's cache (copy=False; the scheduler keeps a request's blocks
until the link has sent them). `kv_link_staging_copy` copies them out of P's cache first (send_layer's
copy=True, which lets a caller reuse its blocks at once; the prefill worker's path before delayed free).

The paths take turns within each round, so load from other processes hits all alike; report medians:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_link_bench.py --out benchmarks/results/cpu/kv_link.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from glmserve.engine.kv_receiver import KVLinkServer
from glmserve.engine.kv_sender import KVLinkClient

GiB = 1 << 30
RAW_BIG = 64 << 20


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # gqa | mla
    layers: int
    tokens: int  # per message: one chunked-prefill chunk of one layer
    heads: int = 0
    dim: int = 0
    latent: int = 0
    block_size: int = 16

    def cache(self, seed: int | None = None) -> torch.Tensor:
        blocks = -(-self.tokens // self.block_size)
        shape = ((blocks, 2, self.block_size, self.heads, self.dim) if self.kind == "gqa"
                 else (blocks, self.block_size, self.latent))
        return torch.zeros(shape, dtype=torch.bfloat16) if seed is None else torch.randn(shape).to(torch.bfloat16)

    @property
    def message_bytes(self) -> int:
        return self.tokens * 2 * (2 * self.heads * self.dim if self.kind == "gqa" else self.latent)


SCENARIOS = {
    s.name: s for s in [
        # GLM-4.5: 92 layers, 8 KV heads x 128 (4 KiB per token per layer in bf16); a 2048-token chunk.
        Scenario("glm45-gqa", "gqa", 92, 2048, heads=8, dim=128),
        # GLM-4.7-Flash: 47 layers, MLA latent 512 + rope 64 (1152 B per token per layer); one full
        # 8192-token chunk (the default --chunked-prefill-size) per message.
        Scenario("glm47flash-mla", "mla", 47, 8192, latent=576),
    ]
}


def _raw_group(port: int, rank: int, name: str) -> dist.ProcessGroupGloo:
    store = dist.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=60))
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    opts._timeout = datetime.timedelta(seconds=60)
    return dist.ProcessGroupGloo(dist.PrefixStore(name, store), rank, 2, opts)


def _p_main(conn, port: int, threads: int) -> None:
    """Prefill side: answers D's commands."""
    torch.set_num_threads(threads)
    client = KVLinkClient()
    caches: dict[str, torch.Tensor] = {}
    raw = None
    while True:
        cmd = conn.recv()
        if cmd[0] == "link":
            _, address, sc, tid, copy = cmd
            cache = caches.setdefault(sc.name, sc.cache(seed=0))
            tx = client.sender(address)
            blocks = list(range(cache.shape[0]))
            for layer in range(sc.layers):
                tx.send_layer(tid, layer, cache, blocks, 0, sc.tokens, copy=copy)
            conn.send(tx.finish(tid).result(120))
        elif cmd[0] == "raw_setup":
            raw = _raw_group(port, 1, cmd[1])
            conn.send("ok")
        elif cmd[0] == "raw":
            _, nbytes, count = cmd
            buf = torch.ones(nbytes, dtype=torch.uint8)
            for _ in range(count):
                raw.send([buf], 0, 0).wait()
            conn.send("ok")
        else:
            client.close()
            return


def _time_link(rx, d_cache: torch.Tensor, conn, sc: Scenario, copy: bool = True) -> float:
    """One transfer: from D's request to P until every layer is in D's cache."""
    tid = rx.new_transfer_id()
    h = rx.expect(tid, [d_cache] * sc.layers, list(range(d_cache.shape[0])), sc.tokens, sc.layers)
    t0 = time.perf_counter()
    conn.send(("link", rx.address, sc, tid, copy))
    got = h.wait(120)
    dt = time.perf_counter() - t0
    assert conn.recv() == got == sc.layers * sc.message_bytes, "byte count mismatch"
    return dt


def _time_raw(pg, buf: torch.Tensor, conn, count: int) -> float:
    t0 = time.perf_counter()
    conn.send(("raw", buf.numel(), count))
    for _ in range(count):
        pg.recv([buf], 1, 0).wait()
    dt = time.perf_counter() - t0
    assert conn.recv() == "ok"
    return dt


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where to write the JSON results")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    ap.add_argument("--tokens", type=int, help="tokens per message (overrides the scenario's)")
    # The link's gathers/scatters are memory-bound; on 2 shared cores OpenMP spinning of a second intra-op
    # thread doubled P's CPU time and slowed the link by a third.
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in both processes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scenarios = [SCENARIOS[n] for n in (args.scenario or SCENARIOS)]
    if args.tokens:
        scenarios = [Scenario(**{**asdict(s), "tokens": args.tokens}) for s in scenarios]

    server = KVLinkServer("127.0.0.1", 0)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_p_main, args=(child, server.port, args.threads), daemon=True)
    proc.start()
    conn.send(("raw_setup", "raw-bench"))
    pg = _raw_group(server.port, 0, "raw-bench")
    assert conn.recv() == "ok"

    rows = []
    rx = server.receiver("bench-p")
    for sc in scenarios:
        total = sc.layers * sc.message_bytes
        n_big = max(1, total // RAW_BIG)
        d_cache = sc.cache()
        same, big = torch.empty(sc.message_bytes, dtype=torch.uint8), torch.empty(total // n_big, dtype=torch.uint8)
        runs = {  # path -> (message bytes, messages, one timed run)
            "kv_link": (sc.message_bytes, sc.layers, lambda: _time_link(rx, d_cache, conn, sc, False)),
            "kv_link_staging_copy": (sc.message_bytes, sc.layers, lambda: _time_link(rx, d_cache, conn, sc)),
            "raw_gloo_same_msgs": (sc.message_bytes, sc.layers, lambda: _time_raw(pg, same, conn, sc.layers)),
            "raw_gloo_big_msgs": (total // n_big, n_big, lambda: _time_raw(pg, big, conn, n_big)),
        }
        times: dict[str, list[float]] = {path: [] for path in runs}
        for i in range(args.iters + 1):  # paths take turns, so load from other processes hits all alike
            for path, (_, _, run) in runs.items():
                dt = run()
                if i:  # the first round connects and warms buffers up
                    times[path].append(dt)
        for path, (msg_bytes, count, _) in runs.items():
            times_ = times[path]
            nbytes = msg_bytes * count
            rows.append({"scenario": sc.name, "path": path, "message_bytes": msg_bytes, "messages": count,
                         "total_bytes": nbytes, "seconds": times_,
                         "gib_per_s_median": nbytes / statistics.median(times_) / GiB,
                         "gib_per_s_best": nbytes / min(times_) / GiB})
    for r in rows:  # the target: the link next to raw gloo moving the same messages
        raw = next(x for x in rows if x["scenario"] == r["scenario"] and x["path"] == "raw_gloo_same_msgs")
        r["of_raw_same_msgs"] = r["gib_per_s_median"] / raw["gib_per_s_median"]
        # Within each round the paths ran back to back: the median of per-round ratios is steadier on a
        # shared machine than the ratio of medians.
        r["of_raw_same_msgs_paired"] = statistics.median(
            (r["total_bytes"] / t) / (raw["total_bytes"] / t_raw) for t_raw, t in zip(raw["seconds"], r["seconds"]))
    conn.send(("exit",))
    proc.join(30)
    server.close()

    print(f"{'scenario':<16} {'path':<22} {'msg MiB':>8} {'total MiB':>10} {'GiB/s med':>10} {'GiB/s best':>11} {'of raw':>7} {'paired':>7}")
    for r in rows:
        mib = r["message_bytes"] / 2**20, r["total_bytes"] / 2**20
        print(f"{r['scenario']:<16} {r['path']:<22} {mib[0]:>8.2f} {mib[1]:>10.1f} "
              f"{r['gib_per_s_median']:>10.2f} {r['gib_per_s_best']:>11.2f} {r['of_raw_same_msgs']:>7.0%} {r['of_raw_same_msgs_paired']:>7.0%}")
    result = {
        "hostname": socket.gethostname(), "git_commit": _git_commit(), "torch": torch.__version__,
        "python": platform.python_version(), "cpu_count": mp.cpu_count(), "iters": args.iters,
        "torch_threads": args.threads, "loadavg_1m_at_end": os.getloadavg()[0],
        "scenarios": [asdict(s) for s in scenarios], "results": rows,
        "d_bytes_received": rx.bytes_received, "d_bytes_in_place": rx.bytes_in_place,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
