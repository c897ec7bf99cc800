"""The `glmserve` command. The only place that reads argv and environment variables: it builds the
frozen config objects and hands them down."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from glmserve.cli_errors import USER_ERRORS, OneLineParser, report
from glmserve.cli_args import (WORKER_DEFAULTS, HelpWithDefaults, add_engine_args, add_router_args, check_engine_args,
                               engine_argv, engine_config, resolve_model_arg, router_config, worker_config)
from glmserve.worker.config import DEFAULT_PORTS


def cache_dir() -> Path:
    from glmserve.engine.model_source import DEFAULT_CACHE_DIR

    return Path(os.environ.get("GLMSERVE_CACHE", DEFAULT_CACHE_DIR))


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from glmserve.engine.tiny_model import build_tiny_model

    out = build_tiny_model(args.arch, Path(args.out), seed=args.seed)
    print(f"wrote a tiny {args.arch} checkpoint to {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from glmserve.engine.demo import run_demo

    return run_demo(model=resolve_model_arg(args.model, cache_dir()), dtype=args.dtype, max_tokens=args.max_tokens)


def _cmd_prefill(args: argparse.Namespace) -> int:
    from glmserve.prefill.main import run_prefill_worker

    return run_prefill_worker(worker_config(args, "prefill", cache_dir()))


def _cmd_decode(args: argparse.Namespace) -> int:
    from glmserve.decode.main import run_decode_worker

    return run_decode_worker(worker_config(args, "decode", cache_dir()))


def _cmd_router(args: argparse.Namespace) -> int:
    from glmserve.router.main import run_router

    cfg = router_config(args, cache_dir())
    if args.discovery == "kubernetes":
        from glmserve.router.discovery_k8s import KubernetesDiscovery

        discovery = KubernetesDiscovery(namespace=args.namespace, prefill_service=args.prefill_service,
                                        decode_service=args.decode_service, port_name=args.grpc_port_name)
    else:
        from glmserve.router.discovery import StaticDiscovery

        discovery = StaticDiscovery(list(cfg.prefill), list(cfg.decode))
    return run_router(cfg, discovery, args.max_model_len)


def _cmd_serve(args: argparse.Namespace) -> int:
    from glmserve.single_process.main import run_single_process

    return run_single_process(router_config(args, cache_dir()), engine_config(args, cache_dir()),
                              metrics_compat=args.metrics_compat)


def up_plan(args: argparse.Namespace, model: str):
    """What `glmserve up` starts: every engine flag goes to the workers of both roles, every router flag to
    the router."""
    from glmserve.launcher import LaunchPlan

    check_engine_args(args)  # refuse before starting anything
    if args.nnodes > 1:
        raise SystemExit("glmserve up starts every worker on this machine; --nnodes > 1 is for one worker's "
                         "group across machines (glmserve prefill/decode/serve on each node)")
    if args.prefill < 1 or args.decode < 1:
        raise SystemExit("--prefill and --decode need at least 1 worker each")
    name = args.served_model_name or Path(model).name
    engine_flags = engine_argv(args)
    group_only = _take_flag(engine_flags, "--dist-timeout")  # only a worker of TP > 1 has a group to time out
    worker_args = ["--served-model-name", name, *engine_flags]
    # Each role's tensor-parallel size (--tp sets both); a worker of TP N runs N rank processes.
    tp = {role: args.tensor_parallel_size if getattr(args, f"{role}_tensor_parallel_size") is None
          else getattr(args, f"{role}_tensor_parallel_size") for role in ("prefill", "decode")}
    if min(tp.values()) < 1:
        raise SystemExit("--prefill/--decode-tensor-parallel-size must be at least 1")
    role_args = {role: (("--tensor-parallel-size", str(n)) if n != args.tensor_parallel_size else ())
                 + (group_only if n > 1 else ()) for role, n in tp.items()}
    if args.torch_threads is None:
        # Local processes share the cores: oversubscribed torch threads slow every rank down.
        ranks = args.prefill * tp["prefill"] + args.decode * tp["decode"]
        worker_args += ["--torch-threads", str(max(1, (os.cpu_count() or 1) // ranks))]
    router_args = ["--served-model-name", name, "--request-timeout", str(args.request_timeout),
                   "--routing-policy", args.routing_policy, "--health-interval", str(args.health_interval),
                   "--worker-wait-timeout", str(args.worker_wait_timeout)]
    for flag in ("tool_call_parser", "reasoning_parser", "max_model_len", "api_key", "chat_template", "tokenizer"):
        if getattr(args, flag) is not None:
            router_args += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return LaunchPlan(model=model, num_prefill=args.prefill, num_decode=args.decode, port=args.port, host=args.host,
                      worker_args=tuple(worker_args), router_args=tuple(router_args),
                      prefill_args=role_args["prefill"], decode_args=role_args["decode"])


def _take_flag(argv: list[str], flag: str) -> tuple[str, ...]:
    """Remove `flag VALUE` from argv; return those words (empty when absent)."""
    if flag not in argv:
        return ()
    i = argv.index(flag)
    words = tuple(argv[i:i + 2])
    del argv[i:i + 2]
    return words


def _cmd_up(args: argparse.Namespace) -> int:
    from glmserve.launcher import run_up

    from glmserve.engine.loader import resolve_source

    model = resolve_model_arg(args.model, cache_dir())
    resolve_source(model, args.load_format)  # a bad --model is one line here, not one traceback per worker
    return run_up(up_plan(args, model))


def _cmd_bench(args: argparse.Namespace) -> int:
    from glmserve.bench.cli import run

    return run(args)


def _cmd_operator(args: argparse.Namespace) -> int:
    from glmserve.operator.entry import run_operator

    return run_operator(namespace=args.namespace, all_namespaces=args.all_namespaces)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="glmserve", description="Serve GLM-4.x models: prefill/decode disaggregated.",
                      formatter_class=HelpWithDefaults)
    p.add_argument("--log-level", default=os.environ.get("GLMSERVE_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO (routine status lines), WARNING (faults only), ERROR (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny-model", help="write a tiny random GLM checkpoint (HF format) for tests and demos",
                       formatter_class=HelpWithDefaults)
    t.add_argument("--arch", choices=["glm4_moe", "glm4_moe_lite", "glm4v_moe"], default="glm4_moe",
                   help="architecture: GLM-4.5/4.6 (glm4_moe), GLM-4.7-Flash (glm4_moe_lite) or GLM-4.5V/4.6V "
                        "(glm4v_moe, with its image processor's preprocessor_config.json)")
    t.add_argument("--out", required=True, help="directory to write the checkpoint and tokenizer to")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    t.set_defaults(func=_cmd_tiny_model)

    d = sub.add_parser("demo", help="offline generation on the built-in tiny model", formatter_class=HelpWithDefaults)
    d.add_argument("--model", default=None, help="model directory or preset (default: built-in tiny model)")
    d.add_argument("--dtype", default="float32", help="weight and activation dtype")
    d.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    d.set_defaults(func=_cmd_demo)

    for name, func, text in (("prefill", _cmd_prefill, "run a prefill worker"),
                             ("decode", _cmd_decode, "run a decode worker")):
        w = sub.add_parser(name, help=text, formatter_class=HelpWithDefaults)
        add_engine_args(w)
        grpc_port, http_port = DEFAULT_PORTS[name]
        w.add_argument("--grpc-port", type=int, default=grpc_port, help="gRPC port the router reaches the worker on")
        w.add_argument("--http-port", type=int, default=http_port, help="HTTP port of /health, /load and /metrics")
        w.add_argument("--advertise-host", default=os.environ.get("POD_IP"),
                       help="address peers use to reach this worker (default: --host, or $POD_IP)")
        w.add_argument("--drain-timeout", type=float, default=WORKER_DEFAULTS["drain_timeout"],
                       help="seconds a SIGTERM waits for requests in flight to finish before exiting")
        w.add_argument("--kv-transfer-backend", choices=["auto", "nccl", "gloo"],
                       default=WORKER_DEFAULTS["kv_transfer_backend"],
                       help="KV link: auto = NCCL when both ends are on CUDA, else gloo (host-staged)")
        if name == "decode":
            w.add_argument("--kv-port", type=int, default=WORKER_DEFAULTS["kv_port"],
                           help="port of the KV link's rendezvous store (prefill workers connect to it)")
            w.add_argument("--max-waiting-requests", type=int, default=WORKER_DEFAULTS["max_waiting_requests"],
                           help="requests that may wait for KV blocks; beyond this they are refused (retriable)")
        w.set_defaults(func=func)

    r = sub.add_parser("router", help="run the HTTP router in front of prefill/decode workers",
                       formatter_class=HelpWithDefaults)
    add_router_args(r)
    # Addresses here; `up` takes counts. The short spellings stay as aliases.
    r.add_argument("--prefill-addresses", "--prefill", dest="prefill", default="",
                   help="comma-separated HOST:PORT gRPC addresses of the prefill workers (static discovery)")
    r.add_argument("--decode-addresses", "--decode", dest="decode", default="",
                   help="comma-separated HOST:PORT gRPC addresses of the decode workers (static discovery)")
    r.add_argument("--discovery", choices=["static", "kubernetes"], default="static",
                   help="static: the --prefill/--decode-addresses; kubernetes: the pods behind the services below")
    r.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                   help="kubernetes discovery: namespace of the worker services ($POD_NAMESPACE when set)")
    r.add_argument("--prefill-service", default=None, help="kubernetes discovery: the prefill workers' Service")
    r.add_argument("--decode-service", default=None, help="kubernetes discovery: the decode workers' Service")
    r.add_argument("--grpc-port-name", default="grpc",
                   help="kubernetes discovery: name of the workers' gRPC port in the Service")
    r.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the smallest the workers report)")
    r.set_defaults(func=_cmd_router)

    s = sub.add_parser("serve", help="router and engine in one process (no disaggregation)",
                       formatter_class=HelpWithDefaults)
    add_router_args(s)
    add_engine_args(s, with_host=False)
    s.set_defaults(func=_cmd_serve)

    # `up` takes exactly `serve`'s flags (router + engine) plus how many workers of each role to start.
    u = sub.add_parser("up", help="start a router, prefill and decode workers locally (Ctrl-C stops all)",
                       formatter_class=HelpWithDefaults)
    add_router_args(u)
    add_engine_args(u, with_host=False)
    # Counts here; `router` takes addresses. The short spellings stay as aliases.
    u.add_argument("--num-prefill", "--prefill", dest="prefill", type=int, default=1,
                   help="how many prefill worker processes to start")
    u.add_argument("--num-decode", "--decode", dest="decode", type=int, default=1,
                   help="how many decode worker processes to start")
    u.add_argument("--prefill-tensor-parallel-size", type=int, default=None,
                   help="ranks of each prefill worker (default: --tensor-parallel-size)")
    u.add_argument("--decode-tensor-parallel-size", type=int, default=None,
                   help="ranks of each decode worker (default: --tensor-parallel-size)")
    u.set_defaults(func=_cmd_up)

    b = sub.add_parser("bench", help="online serving benchmark against an OpenAI-compatible server",
                       formatter_class=HelpWithDefaults)
    from glmserve.bench.cli import add_arguments

    add_arguments(b)
    b.set_defaults(func=_cmd_bench)

    o = sub.add_parser("operator", help="run the Kubernetes operator (kopf)", formatter_class=HelpWithDefaults)
    o.add_argument("--namespace", default=None, help="watch GLMDeployments in this namespace only")
    o.add_argument("--all-namespaces", action="store_true", help="watch GLMDeployments in every namespace")
    o.set_defaults(func=_cmd_operator)
    return p


def _subcommand_index(argv: list[str]) -> int:
    """Where the subcommand word is (after top-level options such as --log-level X)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1 if "=" in argv[i] or argv[i] in ("-h", "--help") else 2
    return i


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse argv; `serve`, `up` and the workers first take vLLM/LightLLM spellings (cli_compat), and an unknown flag is
    reported with the subcommand's own usage rather than the top-level one."""
    from glmserve.cli_compat import translate

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    i = _subcommand_index(argv)
    if i < len(argv) and argv[i] in ("serve", "up", "prefill", "decode"):
        sub = commands[argv[i]]
        known = {opt: a.nargs != 0 for a in sub._actions for opt in a.option_strings}
        res = translate(argv[i + 1:], known)
        if res.error:
            sub.error(res.error)
        for note in res.notes:
            print(f"glmserve {argv[i]}: note: {note}", file=sys.stderr)
        argv = argv[:i + 1] + res.argv
    args, extra = parser.parse_known_args(argv)
    if extra:
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        return report(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
