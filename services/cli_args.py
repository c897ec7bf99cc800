"""Flags shared by several `glmserve` commands, and the frozen configs built from them.

Every default comes from the config dataclasses (one source); `--help` shows it.
"""

from __future__ import annotations

import argparse
import json
import copy
import dataclasses
from pathlib import Path
from typing import Any

from glmserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.spec_decode.config import MAX_SPECULATIVE_TOKENS
from glmserve.router.config import RouterConfig
from glmserve.worker.config import WorkerConfig


def config_defaults(cls) -> dict[str, Any]:
    """Field name -> default of a config dataclass (fields without one are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


ENGINE_DEFAULTS = config_defaults(EngineConfig)
CACHE_DEFAULTS = config_defaults(CacheConfig)
SCHEDULER_DEFAULTS = config_defaults(SchedulerConfig)
ROUTER_DEFAULTS = config_defaults(RouterConfig)
WORKER_DEFAULTS = config_defaults(WorkerConfig)


class HelpWithDefaults(argparse.HelpFormatter):
    """Appends "(default: X)" to every option that has one, help text or not (argparse's
    ArgumentDefaultsHelpFormatter skips options without help, and fails on them on Python 3.10)."""

    def _format_action(self, action: argparse.Action) -> str:
        if (action.option_strings and action.help is not argparse.SUPPRESS
                and action.default is not None and action.default is not False
                and action.default is not argparse.SUPPRESS and "%(default)" not in (action.help or "")):
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: %(default)s)".strip()
        return super()._format_action(action)


def resolve_model_arg(model: str | None, cache_dir: Path) -> str:
    from glmserve.engine.model_source import resolve_model

    return resolve_model(model, cache_dir)


def add_engine_args(p: argparse.ArgumentParser, with_host: bool = True) -> None:
    """with_host=False: the command also takes the router's flags (--model, --host, ...)."""
    if with_host:
        p.add_argument("--model", default=None, help="model directory or preset (default: built-in tiny model)")
        p.add_argument("--served-model-name", default=None,
                       help="model name clients send and /v1/models lists (default: --model's last path part)")
        p.add_argument("--host", default=WORKER_DEFAULTS["host"], help="address the worker's listeners bind to")
    e, c, s = ENGINE_DEFAULTS, CACHE_DEFAULTS, SCHEDULER_DEFAULTS
    p.add_argument("--dtype", default=e["dtype"], choices=["auto", "bfloat16", "float16", "float32"],
                   help="weight and activation dtype; auto: the checkpoint's (float32 on CPU)")
    p.add_argument("--device", default=e["device"], help="auto | cpu | cuda | cuda:N")
    p.add_argument("--load-format", default=e["load_format"], choices=["auto", "safetensors", "dummy"],
                   help="dummy: random weights of the right shapes (no checkpoint needed; for load tests)")
    p.add_argument("--seed", type=int, default=e["seed"], help="seed of the random weights of --load-format dummy")
    p.add_argument("--max-model-len", type=int, default=s["max_model_len"],
                   help="longest prompt + output in tokens (default: the model's)")
    p.add_argument("--block-size", type=int, default=c["block_size"], help="tokens per KV-cache block")
    p.add_argument("--num-kv-blocks", type=int, default=c["num_blocks"],
                   help="override the KV cache size in blocks (default: sized from memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=c["gpu_memory_utilization"],
                   help="fraction of GPU memory for weights, activations and the KV cache")
    p.add_argument("--cpu-kv-cache-gib", type=float, default=c["cpu_kv_bytes"] / (1 << 30),
                   help="KV cache budget on CPU, in GiB")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=c["enable_prefix_caching"], help="reuse KV blocks of prompt prefixes seen before")
    p.add_argument("--max-num-seqs", type=int, default=s["max_num_seqs"], help="most sequences in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=s["max_num_batched_tokens"],
                   help="most tokens in one engine step (prefill chunks plus decode tokens)")
    p.add_argument("--chunked-prefill-size", type=int, default=s["chunked_prefill_size"],
                   help="longest prefill chunk in tokens; longer prompts are prefilled in several steps")
    p.add_argument("--prefill-attention-backend", default=e["prefill_attention_backend"],
                   choices=["auto", "fa3", "flashinfer", "triton", "torch"],
                   help="attention kernels for prefill; auto picks the fastest available on the device")
    p.add_argument("--decode-attention-backend", default=e["decode_attention_backend"],
                   choices=["auto", "flashinfer", "triton", "torch"],
                   help="attention kernels for decode; auto picks the fastest available on the device")
    p.add_argument("--cuda-graph-max-batch-size", type=int, default=e["cuda_graph_max_batch_size"],
                   help="largest decode batch run as a CUDA graph; larger batches run eagerly")
    p.add_argument("--disable-cuda-graph", action="store_true", default=not e["enable_cuda_graph"],
                   help="run decode eagerly, without CUDA graphs")
    p.add_argument("--cuda-graph-capture-sizes", default=",".join(map(str, e["cuda_graph_capture_sizes"])),
                   help="comma-separated decode batch sizes to capture as CUDA graphs")
    p.add_argument("--metrics-compat", choices=["vllm"], default=WORKER_DEFAULTS["metrics_compat"],
                   help="also export vLLM's metric names (vllm:num_requests_waiting, ...) for the Gateway API "
                        "Inference Extension and KEDA")
    p.add_argument("--speculative-algorithm", choices=["none", "mtp"], default=e["speculative_algorithm"],
                   help="mtp: speculative decoding with the model's multi-token-prediction layer")
    p.add_argument("--speculative-num-steps", type=int, default=e["speculative_num_steps"],
                   help="with --speculative-algorithm mtp: draft tokens proposed per step")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=e["tensor_parallel_size"],
                   help="ranks of this worker (one GPU each; CPU ranks share the cores): heads, MLPs and experts "
                        "split across them")
    p.add_argument("--enable-expert-parallel", action="store_true", default=e["enable_expert_parallel"],
                   help="with --tensor-parallel-size > 1: whole routed experts per rank instead of every expert split")
    p.add_argument("--nnodes", type=int, default=e["nnodes"], help="machines one tensor-parallel group spans")
    p.add_argument("--node-rank", type=int, default=e["node_rank"],
                   help="this machine's index in the group (0 hosts the leader and serves HTTP)")
    p.add_argument("--dist-init-addr", default=e["dist_init_addr"],
                   help="HOST:PORT where node 0's group store listens (same on every node)")
    p.add_argument("--dist-timeout", type=float, default=e["dist_timeout_s"],
                   help="seconds a tensor-parallel group's ranks wait to join and a collective waits for a peer")
    p.add_argument("--no-progress", action="store_true", default=not e["show_progress"],
                   help="no progress bar while loading weights")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's); `glmserve up` splits the cores among workers")


def check_engine_args(args: argparse.Namespace) -> None:
    """Refuse, in one line, engine flags that are accepted by the parser but not implemented yet."""
    if args.tensor_parallel_size < 1:
        raise SystemExit("--tensor-parallel-size must be at least 1")
    if (args.nnodes != 1 or args.node_rank != 0 or args.dist_init_addr) and args.tensor_parallel_size == 1:
        raise SystemExit("--nnodes, --node-rank and --dist-init-addr need --tensor-parallel-size > 1")
    if args.dist_timeout <= 0:
        raise SystemExit("--dist-timeout must be positive")
    largest_tp = max(args.tensor_parallel_size, *(getattr(args, f"{role}_tensor_parallel_size", None) or 1
                                                  for role in ("prefill", "decode")))  # `up` sets them per role
    if args.dist_timeout != ENGINE_DEFAULTS["dist_timeout_s"] and largest_tp == 1:
        raise SystemExit("--dist-timeout needs --tensor-parallel-size > 1")
    if args.tensor_parallel_size > 1 and args.tensor_parallel_size % max(args.nnodes, 1):
        raise SystemExit(f"--nnodes {args.nnodes} must divide --tensor-parallel-size {args.tensor_parallel_size}")
    if args.nnodes > 1 and not args.dist_init_addr:
        raise SystemExit("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address, the same on every node)")
    if not 0 <= args.node_rank < max(args.nnodes, 1):
        raise SystemExit(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1}")
    if args.tensor_parallel_size > 1 and args.speculative_algorithm != "none":
        raise SystemExit("--speculative-algorithm mtp does not support --tensor-parallel-size > 1 yet")
    if args.speculative_algorithm == "none" and args.speculative_num_steps != ENGINE_DEFAULTS["speculative_num_steps"]:
        raise SystemExit("--speculative-num-steps needs --speculative-algorithm mtp")
    if not 1 <= args.speculative_num_steps <= MAX_SPECULATIVE_TOKENS:
        raise SystemExit(f"--speculative-num-steps must be in 1..{MAX_SPECULATIVE_TOKENS}")


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags of `args` that differ from their defaults, as command-line arguments again (how
    `glmserve up` hands every engine flag to its workers)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_engine_args(probe, with_host=False)
    argv: list[str] = []
    for action in probe._actions:
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:  # store_true
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def engine_config(args: argparse.Namespace, cache_dir: Path) -> EngineConfig:
    check_engine_args(args)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
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
        speculative_algorithm=args.speculative_algorithm, speculative_num_steps=args.speculative_num_steps,
        tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
        nnodes=args.nnodes, node_rank=args.node_rank, dist_init_addr=args.dist_init_addr,
        dist_timeout_s=args.dist_timeout,
        cuda_graph_capture_sizes=_sizes(args.cuda_graph_capture_sizes),
    )


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"--cuda-graph-capture-sizes: expected integers separated by commas, got {text!r}")
    if any(s < 1 for s in sizes):
        raise SystemExit("--cuda-graph-capture-sizes: sizes must be positive")
    return sizes


def worker_config(args: argparse.Namespace, role: str, cache_dir: Path) -> WorkerConfig:
    engine = engine_config(args, cache_dir)
    return WorkerConfig(
        role=role, engine=engine, served_model_name=args.served_model_name or Path(engine.model).name,
        host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
        advertise_host=args.advertise_host or ("127.0.0.1" if args.host in ("0.0.0.0", "") else args.host),
        kv_port=getattr(args, "kv_port", WORKER_DEFAULTS["kv_port"]),
        max_waiting_requests=getattr(args, "max_waiting_requests", WORKER_DEFAULTS["max_waiting_requests"]),
        drain_timeout=args.drain_timeout, kv_transfer_backend=args.kv_transfer_backend,
        metrics_compat=args.metrics_compat,
    )


def add_router_args(p: argparse.ArgumentParser) -> None:
    r = ROUTER_DEFAULTS
    p.add_argument("--model", default=None,
                   help="model directory (tokenizer, chat template) or preset (default: built-in tiny model)")
    p.add_argument("--served-model-name", default=None,
                   help="model name clients send and /v1/models lists (default: --model's last path part)")
    p.add_argument("--host", default=r["host"], help="address the HTTP server binds to (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=r["port"], help="HTTP port of the OpenAI-compatible API")
    p.add_argument("--tool-call-parser", choices=["glm45", "glm47"], default=r["tool_call_parser"],
                   help="parse tool calls out of the model's text into tool_calls (default: none, text as is)")
    p.add_argument("--reasoning-parser", choices=["glm45"], default=r["reasoning_parser"],
                   help="split <think> text into reasoning_content (default: none, text as is)")
    p.add_argument("--routing-policy", choices=["prefix-affinity", "least-loaded", "round-robin"],
                   default=r["routing_policy"],
                   help="how the router picks workers: prefix-affinity sends shared prefixes to the same worker")
    p.add_argument("--request-timeout", type=float, default=r["request_timeout"],
                   help="seconds a request may run before it fails with a timeout error")
    p.add_argument("--health-interval", type=float, default=r["health_interval"],
                   help="seconds between polls of each worker's load and health")
    p.add_argument("--worker-wait-timeout", type=float, default=r["worker_wait_timeout"],
                   help="seconds a request waits for a healthy prefill/decode worker before failing with 503")
    p.add_argument("--api-key", default=r["api_key"],
                   help="require `Authorization: Bearer KEY` (or `x-api-key: KEY`) on every endpoint but /health, "
                        "/metrics and /load")
    p.add_argument("--chat-template", default=r["chat_template"],
                   help="chat template (Jinja) file, or the template text itself, instead of the model's")
    p.add_argument("--tokenizer", default=r["tokenizer"], help="tokenizer directory (default: --model)")
    p.add_argument("--allowed-local-media-path", default=r["allowed_local_media_path"],
                   help="image_url parts may name local files (file:// or a path) under this directory only")
    p.add_argument("--limit-mm-per-prompt", default=str(r["limit_mm_per_prompt"]),
                   help='most images per request: N, or vLLM\'s JSON form \'{"image": N}\'')


def router_config(args: argparse.Namespace, cache_dir: Path) -> RouterConfig:
    model = resolve_model_arg(args.model, cache_dir)
    split = (lambda s: tuple(a for a in (s or "").split(",") if a))
    return RouterConfig(
        model=model, served_model_name=args.served_model_name or Path(model).name, host=args.host, port=args.port,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        request_timeout=args.request_timeout, routing_policy=args.routing_policy,
        health_interval=args.health_interval, worker_wait_timeout=args.worker_wait_timeout, prefill=split(getattr(args, "prefill", "")),
        decode=split(getattr(args, "decode", "")),
        api_key=args.api_key, chat_template=read_chat_template(args.chat_template),
        tokenizer=resolve_model_arg(args.tokenizer, cache_dir) if args.tokenizer else None,
        allowed_local_media_path=_media_dir(args.allowed_local_media_path),
        limit_mm_per_prompt=_image_limit(args.limit_mm_per_prompt),
    )


def _media_dir(value: str | None) -> str | None:
    if value is not None and not Path(value).is_dir():
        raise SystemExit(f"--allowed-local-media-path: {value} is not a directory")
    return value


def _image_limit(text: str) -> int:
    """--limit-mm-per-prompt: N or {"image": N} (video is not served: a nonzero video limit is refused)."""
    try:
        value = json.loads(text)
    except ValueError:
        raise SystemExit(f'--limit-mm-per-prompt: expected N or {{"image": N}}, got {text!r}')
    if isinstance(value, dict):
        unknown = {k for k, v in value.items() if k != "image" and v}
        if unknown:
            raise SystemExit(f"--limit-mm-per-prompt: only images are served, not {', '.join(sorted(unknown))}")
        value = value.get("image", ROUTER_DEFAULTS["limit_mm_per_prompt"])
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SystemExit(f"--limit-mm-per-prompt: the image limit must be an integer >= 0, got {value!r}")
    return value


def read_chat_template(value: str | None) -> str | None:
    """vLLM's rule: a path to a file, else the template text itself (it must look like Jinja)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        value = path.read_text(encoding="utf-8")
    elif "{" not in value:
        raise SystemExit(f"--chat-template: {value} is neither a file nor a Jinja template")
    text = value
    from glmserve.engine.chat_template import compile_chat_template

    try:
        compile_chat_template(text)
    except Exception as exc:  # jinja2's TemplateSyntaxError and friends: the user's input
        raise SystemExit(f"--chat-template: not a valid Jinja template: {exc}")
    return text
