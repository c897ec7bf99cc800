"""Serving throughput of glmserve next to `transformers serve --continuous-batching` on the same
checkpoint, client and load (CPU).

    .venv/bin/python benchmarks/vs_transformers_serve.py --out benchmarks/results/cpu/vs_transformers_serve.json

Checkpoints: (a) the built-in tiny glm4_moe model and (b) a glm4_moe MoE of ~93M parameters with random
weights, written to a temp dir by the same helper (`build_tiny_model` with larger dimensions).
Servers, one at a time: `transformers serve DIR --continuous-batching --device cpu`, `glmserve serve`
(one process) and `glmserve up` (router + 1 prefill + 1 decode worker). Load: `--num-prompts` requests
of `--input-len` random tokens (made with the checkpoint's tokenizer) to /v1/completions, streamed,
`--concurrency` in flight, greedy, `--output-len` max tokens, sent by the official `openai` client.
`ignore_eos` is not sent (transformers serve refuses unknown fields): both servers stop at the same
EOS tokens, so the work is the same when their greedy outputs agree; the JSON records every request's
completion tokens and text, and the table how many texts agree with transformers' (up to a trailing
U+FFFD, see _same_text). Throughput = completion tokens / wall
time of the whole load. Needs `accelerate` (transformers serve) and creates ~/.cache/huggingface/hub,
which transformers serve expects.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from bench_common import environment, print_table, write_json

from glmserve.bench.datasets import random_requests
from glmserve.engine.llm import resolve_model
from glmserve.engine.tiny_model import build_tiny_model
from glmserve.engine.tokenizer import Tokenizer

BIN = Path(sys.executable).parent
# glm4_moe at ~93M parameters: 6 MoE layers of 32 experts (top 4) after 1 dense layer, GQA 8/2 heads.
MOE_93M = dict(hidden_size=512, num_hidden_layers=7, num_attention_heads=8, num_key_value_heads=2,
               head_dim=64, intermediate_size=1536, moe_intermediate_size=280, n_routed_experts=32,
               num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=1,
               num_nextn_predict_layers=0, max_position_embeddings=1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server on port {port} not healthy after {timeout_s:.0f} s")


def server_command(kind: str, model_dir: Path, port: int) -> list[str]:
    if kind == "transformers serve":
        return [str(BIN / "transformers"), "serve", str(model_dir), "--continuous-batching", "--device", "cpu",
                "--dtype", "float32", "--port", str(port), "--host", "127.0.0.1"]
    sub = "serve" if kind == "glmserve serve" else "up"
    return [str(BIN / "glmserve"), sub, "--model", str(model_dir), "--dtype", "float32", "--port", str(port)]


async def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft, parts, usage = None, [], None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            ttft = ttft if ttft is not None else time.perf_counter() - start
            parts.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - start, "completion_tokens": usage,
            "text": "".join(parts)}


async def run_load(base_url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base_url + "/v1", api_key="none", timeout=600, max_retries=0) as client:
        for p in prompts[:2]:  # warm-up, untimed
            await one_request(client, model, p, 4)
        sem = asyncio.Semaphore(concurrency)

        async def bounded(p):
            async with sem:
                return await one_request(client, model, p, max_tokens)

        start = time.perf_counter()
        outs = await asyncio.gather(*(bounded(p) for p in prompts))
        duration = time.perf_counter() - start
    tokens = sum(o["completion_tokens"] or 0 for o in outs)
    ttfts = sorted(o["ttft_s"] for o in outs if o["ttft_s"] is not None)
    return {"duration_s": duration, "completion_tokens": tokens, "output_tok_s": tokens / duration,
            "mean_ttft_ms": 1e3 * sum(ttfts) / max(len(ttfts), 1),
            "missing_usage": sum(o["completion_tokens"] is None for o in outs), "requests": outs}


def serve_and_measure(kind: str, model_dir: Path, prompts: list[str], args) -> dict:
    port = free_port()
    log = open(Path(args.log_dir) / f"{kind.replace(' ', '_')}_{model_dir.name}.log", "w")
    env = dict(os.environ)
    if args.threads:  # torch in every server process reads it (glmserve up sets its workers' own)
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(server_command(kind, model_dir, port), stdout=log, stderr=subprocess.STDOUT,
                            cwd=tempfile.gettempdir(), env=env, start_new_session=True)
    try:
        wait_healthy(port, proc, args.start_timeout)
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
            models = [m["id"] for m in json.loads(r.read())["data"]]
        model = models[0] if models else str(model_dir)
        return asyncio.run(run_load(base, model, prompts, args.output_len, args.concurrency))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", default="tiny,moe93m", help="comma list of: tiny, moe93m")
    p.add_argument("--servers", default="transformers serve,glmserve serve,glmserve up",
                   help="comma list of: transformers serve, glmserve serve, glmserve up")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=130)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS for the servers (0: torch's default, every core); on a shared machine 1 "
                        "avoids OpenMP threads waiting on each other")
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--log-dir", default=tempfile.gettempdir(), help="server logs go here")
    p.add_argument("--label", default="", help="free text saved in the JSON (e.g. before / after)")
    p.add_argument("--out", default="benchmarks/results/cpu/vs_transformers_serve.json")
    args = p.parse_args()
    (Path.home() / ".cache" / "huggingface" / "hub").mkdir(parents=True, exist_ok=True)
    servers = [s.strip() for s in args.servers.split(",")]
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.checkpoints.split(","):
            if name == "tiny":
                model_dir = Path(resolve_model(None))
            elif name == "moe93m":
                model_dir = build_tiny_model("glm4_moe", Path(tmp) / "glm4_moe-93m", seed=0, overrides=MOE_93M)
            else:
                raise SystemExit(f"unknown checkpoint {name!r} (tiny, moe93m)")
            tok = Tokenizer(str(model_dir))
            reqs = random_requests(args.num_prompts, args.input_len, args.output_len, 0.0, args.seed, tok)
            prompts = [r.prompt for r in reqs]
            params = num_params(model_dir)
            results = {}
            for kind in servers:
                print(f"  {name}: {kind} ...", flush=True)
                try:
                    results[kind] = serve_and_measure(kind, model_dir, prompts, args)
                except Exception as e:  # noqa: BLE001 - a failed server is a row with its error, not a lost run
                    print(f"  {name}: {kind} failed: {type(e).__name__}: {e}", flush=True)
                    results[kind] = {"error": f"{type(e).__name__}: {e}"}
            raw[name] = results
            base = results.get("transformers serve")
            base = None if base is None or "error" in base else base
            for kind, r in results.items():
                if "error" in r:
                    rows.append({"checkpoint": name, "server": kind, "error": r["error"]})
                    continue
                agree = None
                if base is not None:
                    agree = sum(_same_text(a["text"], b["text"]) for a, b in zip(r["requests"], base["requests"]))
                rows.append({"checkpoint": name, "params_m": params / 1e6, "server": kind,
                             "output_tok_s": r["output_tok_s"], "completion_tokens": r["completion_tokens"],
                             "duration_s": r["duration_s"], "mean_ttft_ms": r["mean_ttft_ms"],
                             "x_transformers": r["output_tok_s"] / base["output_tok_s"] if base else None,
                             "texts_equal_transformers": agree})
    print_table(f"serving, {args.num_prompts} requests, concurrency {args.concurrency}, {args.input_len}-token "
                f"prompts, {args.output_len} greedy tokens max (CPU)", rows,
                [("checkpoint", "checkpoint", ""), ("params_m", "M params", ".1f"), ("server", "server", ""),
                 ("output_tok_s", "out tok/s", ".0f"), ("x_transformers", "x transformers", ".2f"),
                 ("completion_tokens", "tokens", "d"), ("mean_ttft_ms", "TTFT ms", ".0f"),
                 ("texts_equal_transformers", "same text", "d"), ("error", "error", "")])
    write_json(args.out, {"environment": environment(torch.device("cpu")), "arguments": vars(args),
                          "cpu_count": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0],
                          "results": rows, "raw": raw})
    return 0


def _same_text(a: str, b: str) -> bool:
    """Equal up to trailing U+FFFD: at the end of a stream glmserve flushes an incomplete UTF-8 sequence
    as U+FFFD where transformers serve drops it."""
    return a.rstrip("\ufffd") == b.rstrip("\ufffd")


def num_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                total += math.prod(fh.get_slice(k).get_shape())
    return total


if __name__ == "__main__":
    raise SystemExit(main())
