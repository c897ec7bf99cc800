"""Multi-turn chat over the disaggregated path, with decode-side prefix reuse on and off: KV bytes on the
link and mean TTFT per turn.

16 conversations x 8 turns, each turn ~200 new user tokens then a 32-token greedy reply, all
conversations in lockstep (turn k of all of them at once), 1 prefill + 2 decode workers and a router
started here as separate processes. "off" runs the decode workers with --no-enable-prefix-caching (on a
decode worker the prefix cache serves only this reuse), everything else equal.

    .venv/bin/python benchmarks/multiturn_reuse.py [--out benchmarks/results/cpu/multiturn_reuse.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, print_table, write_json  # noqa: E402

from glmserve.engine.tiny_model import build_tiny_model  # noqa: E402
from glmserve.local_ports import free_ports  # noqa: E402


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "glmserve.cli", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, procs, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a process exited while starting")
        try:
            load = httpx.get(url + "/load", timeout=2).json()
            if len(load) == 3 and all(w["healthy"] for w in load.values()):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def counter(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def ask(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """TTFT (s) and the reply's token ids, streamed."""
    start, ttft, ids = time.monotonic(), None, []
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if ttft is None and choice.get("text") is not None:
                ttft = time.monotonic() - start
            ids += choice.get("token_ids") or []
    return ttft or 0.0, ids


def run_mode(model: Path, reuse: bool, a: argparse.Namespace, workdir: Path) -> list[dict]:
    pp, d1, d2, rport = free_ports(4)
    hp, h1, h2 = free_ports(3)
    common = ["--model", str(model), "--dtype", "float32", "--torch-threads", "1", "--no-progress"]
    decode_extra = [] if reuse else ["--no-enable-prefix-caching"]
    procs = [start(["prefill", *common, "--grpc-port", str(pp), "--http-port", str(hp)], workdir / "p.log"),
             start(["decode", *common, *decode_extra, "--grpc-port", str(d1), "--http-port", str(h1), "--kv-port", "0"],
                   workdir / "d1.log"),
             start(["decode", *common, *decode_extra, "--grpc-port", str(d2), "--http-port", str(h2), "--kv-port", "0"],
                   workdir / "d2.log"),
             start(["router", "--model", str(model), "--served-model-name", "m", "--port", str(rport), "--prefill", f"127.0.0.1:{pp}",
                    "--decode", f"127.0.0.1:{d1},127.0.0.1:{d2}"], workdir / "r.log")]
    base = f"http://127.0.0.1:{rport}"
    decode_http = [f"http://127.0.0.1:{h1}", f"http://127.0.0.1:{h2}"]
    rows = []
    try:
        wait_ready(base, procs)
        rng = random.Random(0)
        convs = [[] for _ in range(a.conversations)]

        async def turns():
            async with httpx.AsyncClient(base_url=base, timeout=300) as client:
                for turn in range(1, a.turns + 1):
                    for c in convs:
                        c += [rng.randrange(1, 250) for _ in range(rng.randint(a.new_tokens - 20, a.new_tokens + 20))]
                    before = sum(counter(u, "glmserve:kv_transfer_bytes_total") for u in decode_http)
                    results = await asyncio.gather(*(ask(client, c, a.reply_tokens) for c in convs))
                    after = sum(counter(u, "glmserve:kv_transfer_bytes_total") for u in decode_http)
                    for c, (_, reply) in zip(convs, results):
                        c += reply
                    rows.append({"turn": turn, "mean_ttft_ms": 1000 * sum(t for t, _ in results) / len(results),
                                 "kv_bytes": after - before, "mean_context": sum(map(len, convs)) / len(convs)})
                    await asyncio.sleep(a.pause)  # lets the router's load polls bring the KV events in

        asyncio.run(turns())
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(30)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/cpu/multiturn_reuse.json")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--pause", type=float, default=1.5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_model("glm4_moe", work / "model", seed=0, overrides={"max_position_embeddings": 4096})
        on = run_mode(model, True, a, work)
        off = run_mode(model, False, a, work)
    table = []
    for r_on, r_off in zip(on, off):
        table.append({"turn": r_on["turn"], "context": r_on["mean_context"], "bytes_off": r_off["kv_bytes"],
                      "bytes_on": r_on["kv_bytes"], "saved": 1 - r_on["kv_bytes"] / r_off["kv_bytes"],
                      "ttft_off": r_off["mean_ttft_ms"], "ttft_on": r_on["mean_ttft_ms"]})
    later_on = sum(r["kv_bytes"] for r in on[1:])
    later_off = sum(r["kv_bytes"] for r in off[1:])
    print_table("Multi-turn chat, 1 prefill + 2 decode: KV over the link and TTFT, decode-side reuse off/on", table,
                [("turn", "turn", ""), ("context", "mean context", ".0f"), ("bytes_off", "KV bytes off", ".3e"),
                 ("bytes_on", "KV bytes on", ".3e"), ("saved", "saved", ".1%"), ("ttft_off", "TTFT off ms", ".1f"),
                 ("ttft_on", "TTFT on ms", ".1f")])
    saved = 1 - later_on / later_off
    print(f"\nturns 2..{a.turns}: {saved:.1%} fewer KV bytes on the link with decode-side reuse")
    import torch

    write_json(a.out, {"benchmark": "multiturn_reuse", "environment": environment(torch.device("cpu")),
                       "settings": vars(a), "reuse_on": on, "reuse_off": off,
                       "bytes_saved_from_turn_2": saved})
    return 0


if __name__ == "__main__":
    sys.exit(main())
