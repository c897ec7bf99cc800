"""Flags shared by several `glmserve` commands, and the frozen configs built from them."""

from __future__ import annotations

import argparse
from pathlib import Path

from glmserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.router.config import RouterConfig
from glmserve.worker.config import WorkerConfig


def resolve_model_arg(model: str | None, cache_dir: Path) -> str:
    from glmserve.engine.model_source import resolve_model

    return resolve_model(model, cache_dir)


def add_engine_args(p: argparse.ArgumentParser, with_host: bool = True) -> None:
    """with_host=False: the command also takes the router's flags (--model, --host, ...)."""
    if with_host:
        p.add_argument("--model", default=None, help="model directory or preset (default: built-in tiny model)")
        p.add_argument("--served-model-name", default=None)
        p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="override the KV cache size in blocks")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--cpu-kv-cache-gib", type=float, default=0.5)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--chunked-prefill-size", type=int, default=8192)
    p.add_argument("--prefill-attention-backend", default="auto",
                   choices=["auto", "fa3", "flashinfer", "triton", "torch"])
    p.add_argument("--decode-attention-backend", default="auto", choices=["auto", "flashinfer", "triton", "torch"])
    p.add_argument("--cuda-graph-max-batch-size", type=int, default=512)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--speculative-algorithm", choices=["none", "mtp"], default="none")
    p.add_argument("--speculative-num-steps", type=int, default=1)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--no-progress", action="store_true", help="no progress bar while loading weights")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's); `glmserve up` splits the cores among workers")


def engine_config(args: argparse.Namespace, cache_dir: Path) -> EngineConfig:
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.tensor_parallel_size != 1:
        raise SystemExit("--tensor-parallel-size > 1 is not supported yet")
    if args.speculative_algorithm != "none":
        raise SystemExit("--speculative-algorithm mtp is not supported yet")
    return EngineConfig(
        model=resolve_model_arg(args.model, cache_dir), dtype=args.dtype, device=args.device,
        load_format=args.load_format, seed=args.seed,
        prefill_attention_backend=args.prefill_attention_backend,
        decode_attention_backend=args.decode_attention_backend,
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          cpu_kv_bytes=int(args.cpu_kv_cache_gib * (1 << 30)),
                          enable_prefix_caching=args.enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  chunked_prefill_size=args.chunked_prefill_size, max_model_len=args.max_model_len),
        show_progress=not args.no_progress,
        enable_cuda_graph=not args.disable_cuda_graph,
        cuda_graph_max_batch_size=args.cuda_graph_max_batch_size,
    )


def worker_config(args: argparse.Namespace, role: str, cache_dir: Path) -> WorkerConfig:
    engine = engine_config(args, cache_dir)
    return WorkerConfig(
        role=role, engine=engine, served_model_name=args.served_model_name or Path(engine.model).name,
        host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
        advertise_host=args.advertise_host or ("127.0.0.1" if args.host in ("0.0.0.0", "") else args.host),
        kv_port=getattr(args, "kv_port", 29600), max_waiting_requests=getattr(args, "max_waiting_requests", 256),
        drain_timeout=args.drain_timeout, kv_transfer_backend=args.kv_transfer_backend,
    )


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (tokenizer, chat template)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tool-call-parser", choices=["glm45", "glm47"], default=None)
    p.add_argument("--reasoning-parser", choices=["glm45"], default=None)
    p.add_argument("--routing-policy", choices=["prefix-affinity", "least-loaded", "round-robin"],
                   default="prefix-affinity")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--health-interval", type=float, default=1.0)
    p.add_argument("--worker-wait-timeout", type=float, default=10.0,
                   help="seconds a request waits for a healthy prefill/decode worker before failing with 503")


def router_config(args: argparse.Namespace, cache_dir: Path) -> RouterConfig:
    model = resolve_model_arg(args.model, cache_dir)
    split = (lambda s: tuple(a for a in (s or "").split(",") if a))
    return RouterConfig(
        model=model, served_model_name=args.served_model_name or Path(model).name, host=args.host, port=args.port,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        request_timeout=args.request_timeout, routing_policy=args.routing_policy,
        health_interval=args.health_interval, worker_wait_timeout=args.worker_wait_timeout, prefill=split(getattr(args, "prefill", "")),
        decode=split(getattr(args, "decode", "")),
    )
