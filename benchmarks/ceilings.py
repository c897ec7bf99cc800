"""Hardware ceilings measured on this device: copy bandwidth and matmul rates (bf16, and FP8 where the
GPU has FP8 tensor cores). The other benchmarks call `measure` in the same run and report next to it.

    python benchmarks/ceilings.py --out benchmarks/results/ceilings.json
"""

from __future__ import annotations

import argparse

import torch

from bench_common import add_common_args, environment, print_table, resolve_device, time_fn, write_json


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, iters: int) -> dict:
    """dst.copy_(src) of `nbytes`: each byte read once and written once, so 2 * nbytes move per copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup, iters)
    return {"bytes": nbytes, "median_ms": t["median_ms"], "gbps": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9}


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, warmup: int, iters: int) -> dict:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_fn(lambda: a @ b, device, warmup, iters)
    return {"n": n, "dtype": str(dtype), "median_ms": t["median_ms"], "tflops": 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12}


def fp8_matmul_rate(device: torch.device, n: int, warmup: int, iters: int) -> dict | None:
    """torch._scaled_mm with row-wise scales (what fp8_linear uses), where the GPU supports it."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0) or not hasattr(torch, "_scaled_mm"):
        return None
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    sa, sb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
    t = time_fn(lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16), device, warmup, iters)
    return {"n": n, "dtype": "float8_e4m3fn", "median_ms": t["median_ms"], "tflops": 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12}


def measure(device: torch.device, tiny: bool, warmup: int = 3, iters: int = 20) -> dict:
    """{copy_gbps, matmul_tflops (bf16; fp32 on CPU), fp8_matmul_tflops or None, raw}."""
    if tiny:
        copy = copy_bandwidth(device, 16 << 20, warmup, iters)
        mm = [matmul_rate(device, 256, torch.float32 if device.type == "cpu" else torch.bfloat16, warmup, iters)]
        fp8 = None
    else:
        copy = copy_bandwidth(device, 2 << 30, warmup, iters)
        mm = [matmul_rate(device, n, torch.bfloat16, warmup, iters) for n in (4096, 8192)]
        fp8 = fp8_matmul_rate(device, 8192, warmup, iters)
    best = max(mm, key=lambda r: r["tflops"])
    return {"copy_gbps": copy["gbps"], "matmul_tflops": best["tflops"],
            "fp8_matmul_tflops": fp8["tflops"] if fp8 else None,
            "raw": {"copy": copy, "matmul": mm, "fp8_matmul": fp8}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "benchmarks/results/ceilings.json")
    args = p.parse_args(argv)
    device = resolve_device(args, "ceilings.py")
    c = measure(device, args.tiny, args.warmup, args.iters)
    rows = [{"what": "device copy (read + write)", "value": c["copy_gbps"], "unit": "GB/s"},
            {"what": f"matmul {c['raw']['matmul'][-1]['dtype']}", "value": c["matmul_tflops"], "unit": "TFLOP/s"},
            {"what": "matmul fp8 (_scaled_mm, row-wise)", "value": c["fp8_matmul_tflops"], "unit": "TFLOP/s"}]
    env = environment(device)
    print_table(f"Ceilings on {env.get('gpu') or env['device']}", rows,
                [("what", "ceiling", ""), ("value", "measured", ".1f"), ("unit", "unit", "")])
    payload = {"benchmark": "ceilings", "tiny": args.tiny, "environment": env, "ceilings": c}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
