"""Achieved bandwidth and FLOP rate of each attention and MoE kernel at GLM-4.7-Flash shapes (GQA at
GLM-4.5-Air's: Flash has no GQA layer), next to the ceilings measured in the same run.

Rows: Triton kernels called directly (MLA decode/prefill, GQA decode/prefill, fused MoE bf16 and FP8,
RMSNorm), the FP8 and bf16 Linear GEMMs, and one layer's attention through each attention backend that
can run here (triton, flashinfer, fa3: store + absorb + attend + expand, planned once per step).

    python benchmarks/kernel_bench.py --out benchmarks/results/kernels.json
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch

from bench_common import (
    add_common_args, environment, print_table, resolve_device, time_fn, tiny_flash_config, write_json,
)


@dataclass
class Case:
    group: str
    kernel: str
    shape: str
    fn: Callable[[], object] | None
    bytes: float  # bytes the kernel must move at least
    flops: float
    fp8: bool = False  # compare with the FP8 matmul rate
    note: str = ""


def _paged(batch: int, cached: int, new: int, block_size: int, device) -> dict:
    """Block tables etc. for `batch` sequences of `cached` + `new` tokens on disjoint blocks (block 0 unused)."""
    pages = -(-(cached + new) // block_size)
    i32 = dict(dtype=torch.int32, device=device)
    return {
        "num_blocks": batch * pages + 1,
        "block_tables": (torch.arange(batch * pages, **i32) + 1).view(batch, pages),
        "query_start_loc": torch.arange(0, batch * new + 1, new, **i32),
        "seq_lens": torch.full((batch,), cached + new, **i32),
    }


def mla_cases(cfg, device, dtype, decode: list[tuple[int, int]], prefill: list[int], bs: int) -> list[Case]:
    from glmserve.kernels.mla_attention import mla_attention, mla_attention_splits

    h, r, dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    cases = []
    for batch, ctx in decode:
        p = _paged(batch, ctx, 1, bs, device)
        cache = torch.randn(p["num_blocks"], bs, r + dr, device=device).to(dtype)
        ql, qr = torch.randn(batch, h, r, device=device).to(dtype), torch.randn(batch, h, dr, device=device).to(dtype)
        splits = mla_attention_splits(device, batch, h, 1, ctx + 1)
        fn = (lambda ql=ql, qr=qr, cache=cache, p=p, s=splits: mla_attention(
            ql, qr, cache, p["query_start_loc"], p["seq_lens"], p["block_tables"], 0.1, max_query_len=1, num_splits=s))
        kv = batch * (ctx + 1) * (r + dr) * cache.element_size()
        cases.append(Case("attention", "triton mla decode", f"B={batch} ctx={ctx} splits={splits}", fn,
                          kv + batch * h * (2 * r + dr) * cache.element_size(), 2 * batch * h * (ctx + 1) * (2 * r + dr)))
    for length in prefill:
        p = _paged(1, 0, length, bs, device)
        cache = torch.randn(p["num_blocks"], bs, r + dr, device=device).to(dtype)
        ql, qr = torch.randn(length, h, r, device=device).to(dtype), torch.randn(length, h, dr, device=device).to(dtype)
        fn = (lambda ql=ql, qr=qr, cache=cache, p=p, n=length: mla_attention(
            ql, qr, cache, p["query_start_loc"], p["seq_lens"], p["block_tables"], 0.1, max_query_len=n))
        pairs = length * (length + 1) // 2
        cases.append(Case("attention", "triton mla prefill", f"chunk={length}", fn,
                          length * (r + dr + h * (2 * r + dr)) * cache.element_size(), 2 * h * pairs * (2 * r + dr)))
    return cases


def gqa_cases(cfg, device, dtype, decode: list[tuple[int, int]], prefill: list[int], bs: int) -> list[Case]:
    from glmserve.kernels.paged_attention import paged_attention, paged_attention_splits

    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cases = []
    for batch, ctx in decode:
        p = _paged(batch, ctx, 1, bs, device)
        cache = torch.randn(p["num_blocks"], 2, bs, hkv, d, device=device).to(dtype)
        q = torch.randn(batch, hq, d, device=device).to(dtype)
        splits = paged_attention_splits(device, batch, hkv, 1, ctx + 1)
        fn = (lambda q=q, cache=cache, p=p, s=splits: paged_attention(
            q, cache, p["query_start_loc"], p["seq_lens"], p["block_tables"], d**-0.5, max_query_len=1, num_splits=s))
        cases.append(Case("attention", "triton gqa decode (4.5-Air heads)", f"B={batch} ctx={ctx} splits={splits}", fn,
                          batch * (ctx + 1) * 2 * hkv * d * cache.element_size() + 2 * batch * hq * d * cache.element_size(),
                          4 * batch * hq * d * (ctx + 1)))
    for length in prefill:
        p = _paged(1, 0, length, bs, device)
        cache = torch.randn(p["num_blocks"], 2, bs, hkv, d, device=device).to(dtype)
        q = torch.randn(length, hq, d, device=device).to(dtype)
        fn = (lambda q=q, cache=cache, p=p, n=length: paged_attention(
            q, cache, p["query_start_loc"], p["seq_lens"], p["block_tables"], d**-0.5, max_query_len=n))
        cases.append(Case("attention", "triton gqa prefill (4.5-Air heads)", f"chunk={length}", fn,
                          length * (2 * hkv + 2 * hq) * d * cache.element_size(), 4 * hq * d * length * (length + 1) // 2))
    return cases


def backend_cases(cfg, device, dtype, decode: list[tuple[int, int]], prefill: list[int], bs: int) -> list[Case]:
    """One layer's MLA attention through each backend, as the model calls it."""
    from glmserve.engine.attention import registry
    from glmserve.engine.attention.backend import MLAWeights
    from glmserve.engine.attention.context import SeqChunk, build_context

    h, r, dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    kv_b = torch.randn(h, nope + v, r, device=device).to(dtype) * 0.02
    weights = MLAWeights(w_uk=kv_b[:, :nope], w_uv=kv_b[:, nope:])
    elt = torch.empty((), dtype=dtype).element_size()
    cases = []
    for name in ("triton", "flashinfer", "fa3"):
        reason = registry.unavailable_reason(name, device)
        if name == "triton" and device.type == "cpu":
            from glmserve.engine.attention.triton_backend import TritonAttentionBackend

            backend = TritonAttentionBackend()  # the interpreter runs it (smoke mode)
        elif reason is not None:
            cases.append(Case("backend", f"{name} mla layer", "-", None, 0, 0, note=f"unavailable: {reason}"))
            continue
        else:
            backend = registry.create(name, device)
        steps = [("decode", b, c, 1) for b, c in decode] + [("prefill", 1, 0, n) for n in prefill]
        for kind, batch, ctx, new in steps:
            pages = -(-(ctx + new) // bs)
            cache = torch.zeros(batch * pages + 1, bs, r + dr, device=device, dtype=dtype)
            seqs = [SeqChunk(list(range(1 + i * pages, 1 + (i + 1) * pages)), ctx, new) for i in range(batch)]
            fctx = build_context(seqs, bs, [cache], device)
            backend.prepare(fctx)
            t = batch * new
            q_nope = torch.randn(t, h, nope, device=device).to(dtype)
            q_rope = torch.randn(t, h, dr, device=device).to(dtype)
            latent, k_rope = torch.randn(t, r, device=device).to(dtype), torch.randn(t, dr, device=device).to(dtype)
            fn = (lambda a=(q_nope, q_rope, latent, k_rope), f=fctx, be=backend:
                  be.mla(0, *a, weights, f, 0.1))
            pairs = batch * (new * ctx + new * (new + 1) // 2)
            flops = 2 * h * pairs * (2 * r + dr) + 2 * t * h * r * (nope + v)
            nbytes = (batch * (ctx + new) * (r + dr) + h * (nope + v) * r + t * h * (nope + dr + v)) * elt
            shape = f"B={batch} ctx={ctx}" if kind == "decode" else f"chunk={new}"
            cases.append(Case("backend", f"{name} mla layer {kind}", shape, fn, nbytes, flops))
    return cases


def _routing(tokens: int, experts: int, top_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).to(device)
    return torch.rand(tokens, top_k, device=device), ids


def moe_cases(cfg, device, dtype, token_counts: list[int], fp8_ok: bool) -> list[Case]:
    from glmserve.kernels.fp8_gemm import fp8_fused_moe, quantize_per_token
    from glmserve.kernels.fused_moe import fused_moe

    e, k, hdim, inter = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    w13 = (torch.randn(e, 2 * inter, hdim, device=device) * 0.02).to(dtype)
    w2 = (torch.randn(e, hdim, inter, device=device) * 0.02).to(dtype)
    if fp8_ok:
        w13_8, s13 = quantize_per_token(w13.reshape(-1, hdim))
        w2_8, s2 = quantize_per_token(w2.reshape(-1, inter))
        w13_8, s13, w2_8, s2 = w13_8.view(e, 2 * inter, hdim), s13.view(e, -1), w2_8.view(e, hdim, inter), s2.view(e, -1)
    cases = []
    for t in token_counts:
        x = torch.randn(t, hdim, device=device).to(dtype)
        tw, ids = _routing(t, e, k, device)
        touched = int(torch.unique(ids).numel())
        act = t * k * inter * 2 + t * hdim * 2 + t * k * hdim * 2  # SwiGLU out + in + per-slot out
        flops = 2 * t * k * 3 * hdim * inter
        elt = x.element_size()
        cases.append(Case("moe", "triton fused_moe", f"T={t} experts_hit={touched}",
                          lambda x=x, tw=tw, ids=ids: fused_moe(x, tw, ids, w13, w2),
                          touched * 3 * hdim * inter * elt + act * elt, flops))
        if fp8_ok:
            cases.append(Case("moe", "triton fp8 fused_moe", f"T={t} experts_hit={touched}",
                              lambda x=x, tw=tw, ids=ids: fp8_fused_moe(x, tw, ids, w13_8, w2_8, s13, s2),
                              touched * 3 * hdim * inter + act * elt, flops, fp8=True))
    return cases


def linear_cases(cfg, device, dtype, rows: list[int], fp8_ok: bool) -> list[Case]:
    """The dense MLP's gate_up GEMM [2 * intermediate, hidden] in bf16 and FP8."""
    import torch.nn.functional as F

    from glmserve.engine.fp8 import fp8_linear
    from glmserve.kernels.fp8_gemm import quantize_per_token

    n, k = 2 * cfg.intermediate_size, cfg.hidden_size
    w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
    w8, ws = quantize_per_token(w)
    cases = []
    for m in rows:
        x = torch.randn(m, k, device=device).to(dtype)
        elt = x.element_size()
        cases.append(Case("linear", "F.linear", f"M={m} N={n} K={k}", lambda x=x: F.linear(x, w),
                          (n * k + m * k + m * n) * elt, 2 * m * n * k))
        if fp8_ok:
            cases.append(Case("linear", "fp8_linear", f"M={m} N={n} K={k}", lambda x=x: fp8_linear(x, w8, ws),
                              n * k + (m * k + m * n) * elt, 2 * m * n * k, fp8=True))
    return cases


def norm_cases(cfg, device, dtype, rows: list[int]) -> list[Case]:
    from glmserve.kernels.rmsnorm import rmsnorm_residual

    weight = torch.ones(cfg.hidden_size, device=device, dtype=dtype)
    cases = []
    for t in rows:
        x, res = torch.randn(t, cfg.hidden_size, device=device).to(dtype), torch.randn(t, cfg.hidden_size, device=device).to(dtype)
        cases.append(Case("norm", "triton rmsnorm+residual", f"T={t} H={cfg.hidden_size}",
                          lambda x=x, res=res: rmsnorm_residual(x, res, weight, 1e-5),
                          4 * t * cfg.hidden_size * x.element_size(), 0))
    return cases


def build_cases(device: torch.device, tiny: bool) -> list[Case]:
    from glmserve.engine.fp8 import fp8_gemm_supported
    from glmserve.engine.presets import preset_config

    if tiny:
        flash = tiny_flash_config()
        air = flash.replace(arch="glm4_moe", num_attention_heads=4, num_key_value_heads=2, head_dim=32)
        dtype, bs = torch.float32, 16
        decode, prefill, tokens, rows = [(1, 32), (2, 32)], [16], [1, 16], [1, 16]
    else:
        flash, air = preset_config("GLM-4.7-Flash"), preset_config("GLM-4.5-Air")
        dtype, bs = torch.bfloat16, 16
        decode, prefill, tokens, rows = [(1, 1024), (8, 1024), (64, 1024), (256, 1024)], [1024, 8192], \
            [1, 8, 64, 256, 1024, 8192], [1, 64, 8192]
    fp8_ok = fp8_gemm_supported(device) or tiny
    return (mla_cases(flash, device, dtype, decode, prefill, bs)
            + gqa_cases(air, device, dtype, decode[:1] + decode[2:3], prefill[:1], bs)
            + backend_cases(flash, device, dtype, decode, prefill[-1:], bs)
            + moe_cases(flash, device, dtype, tokens, fp8_ok)
            + linear_cases(flash, device, dtype, rows, fp8_ok)
            + norm_cases(flash, device, dtype, rows[-1:]))


def run_case(c: Case, ceilings: dict, device, warmup: int, iters: int) -> dict:
    row = {"group": c.group, "kernel": c.kernel, "shape": c.shape, "bytes": c.bytes, "flops": c.flops, "note": c.note}
    if c.fn is None:
        return row
    t = time_fn(c.fn, device, warmup, iters)
    sec = t["median_ms"] * 1e-3
    row.update(time_us=t["median_ms"] * 1e3, runs_ms=t["runs_ms"], gbps=c.bytes / sec / 1e9,
               tflops=c.flops / sec / 1e12 if c.flops else None)
    row["pct_bw"] = 100 * row["gbps"] / ceilings["copy_gbps"]
    rate = ceilings["fp8_matmul_tflops"] if c.fp8 and ceilings.get("fp8_matmul_tflops") else ceilings["matmul_tflops"]
    row["pct_mm"] = 100 * row["tflops"] / rate if row["tflops"] is not None else None
    # Which floor binds: the time the bytes need at copy speed vs the time the FLOPs need at matmul rate.
    bw_s = c.bytes / (ceilings["copy_gbps"] * 1e9)
    mm_s = c.flops / (rate * 1e12) if c.flops else 0.0
    row["bound"] = "memory" if bw_s >= mm_s else "compute"
    row["pct_of_floor"] = 100 * max(bw_s, mm_s) / sec
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "benchmarks/results/kernels.json")
    args = p.parse_args(argv)
    device = resolve_device(args, "kernel_bench.py")
    from ceilings import measure

    ceilings = measure(device, args.tiny, args.warmup, args.iters)
    rows = [run_case(c, ceilings, device, args.warmup, args.iters) for c in build_cases(device, args.tiny)]
    env = environment(device)
    print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, matmul {ceilings['matmul_tflops']:.1f} TFLOP/s"
          + (f", fp8 matmul {ceilings['fp8_matmul_tflops']:.1f} TFLOP/s" if ceilings["fp8_matmul_tflops"] else ""))
    print_table(f"Kernels on {env.get('gpu') or env['device']}", rows, [
        ("kernel", "kernel", ""), ("shape", "shape", ""), ("time_us", "us", ".1f"), ("gbps", "GB/s", ".0f"),
        ("pct_bw", "%BW", ".0f"), ("tflops", "TFLOP/s", ".1f"), ("pct_mm", "%MM", ".0f"), ("bound", "bound", ""),
        ("pct_of_floor", "%floor", ".0f"), ("note", "note", "")])
    payload = {"benchmark": "kernels", "tiny": args.tiny, "environment": env, "ceilings": ceilings, "rows": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
