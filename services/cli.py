"""The `glmserve` command. The only place that reads argv and environment variables: it builds the
frozen config objects and hands them down."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("GLMSERVE_CACHE", Path.home() / ".cache" / "glmserve"))


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from glmserve.engine.tiny_model import build_tiny_model

    out = build_tiny_model(args.arch, Path(args.out), seed=args.seed)
    print(f"wrote a tiny {args.arch} checkpoint to {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from glmserve.engine.demo import run_demo

    return run_demo(model=args.model, dtype=args.dtype, cache_dir=cache_dir(), max_tokens=args.max_tokens)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmserve", description="Serve GLM-4.x models: prefill/decode disaggregated.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny-model", help="write a tiny random GLM checkpoint (HF format) for tests and demos")
    t.add_argument("--arch", choices=["glm4_moe", "glm4_moe_lite"], default="glm4_moe")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_tiny_model)

    d = sub.add_parser("demo", help="offline generation on the built-in tiny model")
    d.add_argument("--model", default=None, help="model directory or preset (default: built-in tiny model)")
    d.add_argument("--dtype", default="float32")
    d.add_argument("--max-tokens", type=int, default=32)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
