"""`glmserve bench` options as `vllm bench serve` spells them, checked and resolved into ours.

--backend picks the endpoint, --dataset-name takes vLLM's dataset names, --host/--port build the base
URL, --save-result picks vLLM's result file name, --percentile-metrics / --metric-percentiles choose the
report's rows. What we cannot do is refused with one line naming our nearest option."""

from __future__ import annotations

import argparse
import math
from datetime import datetime
from pathlib import Path

from glmserve.bench.client import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT

BACKEND_ENDPOINTS = {"vllm": COMPLETIONS_ENDPOINT, "openai": COMPLETIONS_ENDPOINT,
                     "openai-chat": CHAT_ENDPOINT, "vllm-chat": CHAT_ENDPOINT}
DATASETS = {"random": "random", "sharegpt": "sharegpt", "prefix-repetition": "prefix-repetition",
            "prefix_repetition": "prefix-repetition", "random-mm": "random-mm"}
# vLLM datasets we do not build, and what to use instead.
DATASET_NEAREST = {
    "hf": "needs the Hugging Face hub (and images for VisionArena); use --dataset-name sharegpt --dataset-path "
          "FILE.json with a local copy",
    "sonnet": "use --dataset-name random or prefix_repetition",
    "burstgpt": "use --dataset-name random with --request-rate",
    "custom": "use --dataset-name sharegpt --dataset-path FILE.json",
}
SECTIONS = ("ttft", "tpot", "itl", "e2el")


def normalize_options(args: argparse.Namespace) -> None:
    """Resolves the vLLM spellings in place; ValueError with a one-line message when something is off."""
    if args.backend is not None:
        if args.backend not in BACKEND_ENDPOINTS:
            raise ValueError(f"--backend {args.backend} is not supported; use one of "
                             f"{', '.join(BACKEND_ENDPOINTS)} (glmserve speaks the OpenAI API)")
        wanted = BACKEND_ENDPOINTS[args.backend]
        if args.endpoint is not None and args.endpoint != wanted:
            raise ValueError(f"--backend {args.backend} sends to {wanted}, not --endpoint {args.endpoint}")
        args.endpoint = wanted
    args.endpoint = args.endpoint or COMPLETIONS_ENDPOINT
    if args.dataset not in DATASETS:
        hint = DATASET_NEAREST.get(args.dataset, f"use one of {', '.join(DATASETS)}")
        raise ValueError(f"--dataset-name {args.dataset} is not supported: {hint}")
    args.dataset = DATASETS[args.dataset]
    if args.dataset == "random-mm" and args.endpoint != CHAT_ENDPOINT:
        raise ValueError("--dataset-name random-mm sends images in chat messages: use --backend openai-chat")
    if args.base_url is None:
        args.base_url = f"http://{args.host}:{args.port}"
    sections = [s.strip() for s in args.percentile_metrics.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise ValueError(f"--percentile-metrics: {','.join(bad) or 'empty'}; choose from {','.join(SECTIONS)}")
    args.sections = tuple(sections)
    try:
        args.percentiles = tuple(float(p) for p in args.metric_percentiles.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--metric-percentiles: numbers separated by commas, got {args.metric_percentiles!r}")
    if not args.percentiles or not all(0 < p <= 100 for p in args.percentiles):
        raise ValueError("--metric-percentiles: each percentile must be in (0, 100]")
    if args.save_result and args.result_file is None:
        args.result_file = str(Path(args.result_dir) / (args.result_filename or default_result_name(args)))


def default_result_name(args: argparse.Namespace) -> str:
    """vLLM's pattern: BACKEND-RATEqps[-concurrencyN]-MODEL-YYYYMMDD-HHMMSS.json."""
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate}"
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    model = args.model.split("/")[-1]
    return f"{args.backend or 'openai'}-{rate}qps{concurrency}-{model}-{datetime.now():%Y%m%d-%H%M%S}.json"
