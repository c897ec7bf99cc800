"""Shared plumbing of the GPU benchmarks: arguments, the CUDA check, timing, the run's environment, the
printed table and the JSON file.

Every benchmark targets CUDA. Without a CUDA device it stops at once with a "needs CUDA" message, unless
run as `--device cpu --tiny`: a smoke mode at toy shapes that exercises the same code (tests run it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent


def add_common_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --tiny)")
    p.add_argument("--tiny", action="store_true", help="toy shapes: a smoke run, on CPU too (no figures)")
    p.add_argument("--out", default=default_out, help="JSON file to write (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    p.add_argument("--iters", type=int, default=None, help="timed runs (the median is reported)")


def resolve_device(args: argparse.Namespace, script: str) -> torch.device:
    """The device to run on; exits with a clear message when this run cannot happen here."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{script}: needs CUDA (torch {torch.__version__} sees no CUDA device). Run it on the GPU "
                 f"machine; for a smoke run of the code here use --device cpu --tiny.")
    if device.type == "cpu" and not args.tiny:
        sys.exit(f"{script}: --device cpu runs only with --tiny (full-size shapes need a GPU)")
    if device.type not in ("cuda", "cpu"):
        sys.exit(f"{script}: unsupported device {args.device!r} (cuda or cpu)")
    if device.type == "cpu":
        # Triton kernels run on CPU only in the interpreter, and it must be on before they are imported.
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 3
    if args.iters is None:
        args.iters = 2 if args.tiny else 20
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> dict:
    """Median / min / mean milliseconds of `fn` over `iters` runs after `warmup` untimed ones; each run
    is timed with CUDA events around it (host overhead included), synchronised after each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "mean_ms": statistics.fmean(times),
            "runs_ms": times}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=20).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """What the figures were measured on: GPU, driver, library versions, git commit."""
    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "device": str(device),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "triton": _version("triton"),
        "flashinfer": _version("flashinfer-python"),
        "flash_attn_3": _version("flash_attn_3") or _version("flash-attn-3"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   driver=_driver())
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); missing values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            line.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return path


def tiny_flash_config():
    """GLM-4.7-Flash's structure (MLA, MoE, first layer dense) at toy sizes, for --tiny runs."""
    from glmserve.engine.presets import preset_config

    return preset_config("GLM-4.7-Flash").replace(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, head_dim=32, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        dense_layers=(True, False), num_nextn_predict_layers=0, max_position_embeddings=4096)


def load_dummy_model(cfg, device: torch.device, dtype: torch.dtype, backend_name: str, seed: int = 0,
                     with_mtp: bool = False):
    """The model of `cfg` with random weights on `device` (as load_format=dummy does), and its backend;
    with_mtp: its MTP layer too (speculative decoding)."""
    from glmserve.engine.attention import registry
    from glmserve.engine.loader import build_model
    from glmserve.engine.weights import fill_dummy_weights

    if backend_name == "triton" and device.type == "cpu":
        from glmserve.engine.attention.triton_backend import TritonAttentionBackend

        backend = TritonAttentionBackend()  # under the interpreter (smoke mode)
    else:
        backend = registry.create(backend_name, device)
    model = build_model(cfg, backend, dtype, device, with_mtp=with_mtp)
    with torch.no_grad():
        fill_dummy_weights(model, seed=seed)
    return model, backend


def make_chunks(num_seqs: int, cached: int, new: int, block_size: int, vocab: int, seed: int = 0):
    """ScheduledChunks of `num_seqs` requests that each have `cached` tokens in the KV cache and compute
    `new` more, on disjoint blocks (block 0 left free)."""
    from glmserve.engine.request import Request
    from glmserve.engine.sampling_params import SamplingParams
    from glmserve.engine.scheduler import ScheduledChunk

    g = torch.Generator().manual_seed(seed)
    pages = -(-(cached + new) // block_size)
    chunks = []
    for i in range(num_seqs):
        req = Request(f"s{i}", torch.randint(0, vocab, (cached + new,), generator=g).tolist(), SamplingParams(max_tokens=1))
        req.block_ids = list(range(1 + i * pages, 1 + (i + 1) * pages))
        req.num_computed_tokens = cached
        chunks.append(ScheduledChunk(req, new))
    return chunks


# Datasheet HBM bandwidth (GB/s), matched against the GPU name: the README's Yardsticks use these.
SPEC_BANDWIDTH_GBPS = (("H100 PCIe", 2000.0), ("H100", 3350.0), ("H200", 4800.0), ("H20", 4000.0))


def spec_bandwidth_gbps(gpu_name: str | None) -> float | None:
    for key, value in SPEC_BANDWIDTH_GBPS:
        if gpu_name and key in gpu_name:
            return value
    return None


def ceilings_then_model(cfg, device: torch.device, dtype: torch.dtype, backend_name: str, args: argparse.Namespace,
                        with_mtp: bool = False):
    """The ceilings measured in the same run, then the dummy model (FP8 when --fp8), timed:
    (ceilings, model, backend, load seconds)."""
    from ceilings import measure

    ceilings = measure(device, args.tiny, args.warmup, args.iters)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the ceiling buffers (GiBs) go back before the model takes its ~60 GB
    t0 = time.perf_counter()
    model, backend = load_dummy_model(cfg, device, dtype, backend_name, with_mtp=with_mtp)
    if getattr(args, "fp8", False):
        from glmserve.engine.fp8 import quantize_model_fp8

        quantize_model_fp8(model)
    return ceilings, model, backend, time.perf_counter() - t0
