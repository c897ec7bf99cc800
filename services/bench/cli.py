"""`glmserve bench`: arguments, and the run that ties dataset, driver, metrics and report together."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path
from typing import Sequence

import aiohttp

from glmserve.bench.client import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, RequestOutput, build_payload, send_request
from glmserve.bench.datasets import (SampleRequest, TextTokenizer, prefix_repetition_requests, random_requests,
                                     sharegpt_requests)
from glmserve.bench.driver import drive
from glmserve.bench.fit import fit_lengths, server_max_model_len
from glmserve.bench.metrics import compute_metrics
from glmserve.bench.mm_dataset import (DEFAULT_BUCKETS, DEFAULT_LIMIT, parse_buckets, parse_image_limit,
                                       random_mm_requests)
from glmserve.bench.options import normalize_options
from glmserve.bench.report import DEFAULT_PERCENTILE_METRICS, WIDTH, build_result, format_report, write_result
from glmserve.bench.spec_decode import format_section as format_spec_decode
from glmserve.bench.spec_decode import scrape as scrape_spec_decode

# Long generations on a CPU model can take many minutes; only a stalled connection should fail a request.
_READ_TIMEOUT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None,
                        help="server address, without /v1 (default: http://HOST:PORT from --host/--port)")
    parser.add_argument("--host", default="127.0.0.1", help="server host when --base-url is not given")
    parser.add_argument("--port", type=int, default=8000, help="server port when --base-url is not given")
    parser.add_argument("--model", required=True, help="model name sent in each request")
    parser.add_argument("--backend", default=None,
                        help="vLLM's client kinds: vllm|openai (/v1/completions), openai-chat|vllm-chat "
                             "(/v1/chat/completions); picks --endpoint when that is not given")
    parser.add_argument("--endpoint", choices=[COMPLETIONS_ENDPOINT, CHAT_ENDPOINT], default=None,
                        help=f"default: from --backend, else {COMPLETIONS_ENDPOINT}")
    parser.add_argument("--dataset", "--dataset-name", dest="dataset", default="random",
                        help="random | random-mm (random text and images, --backend openai-chat) | sharegpt | "
                             "prefix-repetition (vLLM's prefix_repetition too)")
    parser.add_argument("--random-mm-base-items-per-request", type=int, default=1,
                        help="random-mm: images per request (mean)")
    parser.add_argument("--random-mm-num-mm-items-range-ratio", type=float, default=0.0,
                        help="random-mm: images per request uniform in [base*(1-r), base*(1+r)]")
    parser.add_argument("--random-mm-limit-mm-per-prompt", default=DEFAULT_LIMIT,
                        help='random-mm: most images per request, JSON {"image": N}')
    parser.add_argument("--random-mm-bucket-config", default=DEFAULT_BUCKETS,
                        help="random-mm: image sizes and their probabilities, {(height, width, 1): p, ...}")
    parser.add_argument("--dataset-path", default=None,
                        help="sharegpt: JSON list of {'conversations': [{'from'|'role', 'value'|'content'}]}")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    parser.add_argument("--random-input-len", type=int, default=None,
                        help="random: prompt tokens; prefix-repetition: suffix tokens after the prefix (joined by a "
                             "space) (default: 1024, shrunk to fit the server's max_model_len)")
    parser.add_argument("--random-output-len", type=int, default=None,
                        help="max_tokens for random and prefix-repetition prompts "
                             "(default: 128, shrunk to fit the server's max_model_len)")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="random: lengths uniform in [len*(1-r), len*(1+r)]")
    parser.add_argument("--prefix-len", "--prefix-repetition-prefix-len", dest="prefix_len", type=int, default=256,
                        help="prefix-repetition: shared prefix tokens")
    parser.add_argument("--num-prefixes", "--prefix-repetition-num-prefixes", dest="num_prefixes", type=int,
                        default=10, help="prefix-repetition: distinct prefixes")
    parser.add_argument("--prefix-repetition-suffix-len", type=int, default=None,
                        help="prefix-repetition: suffix tokens (default: --random-input-len)")
    parser.add_argument("--prefix-repetition-output-len", type=int, default=None,
                        help="prefix-repetition: max_tokens (default: --random-output-len)")
    parser.add_argument("--sharegpt-output-len", type=int, default=None,
                        help="sharegpt: fixed max_tokens instead of the recorded reply's length")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests/s with Poisson arrivals; inf sends all at once")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated prompts and lengths")
    parser.add_argument("--tokenizer", default=None,
                        help="model directory: build prompts of exact token length and count input tokens "
                             "locally (default: random words, token counts from the server's usage)")
    parser.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so replies reach max_tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent with each request")
    parser.add_argument("--result-file", default=None, help="write the JSON result here")
    parser.add_argument("--save-result", action="store_true",
                        help="write the JSON result to --result-dir/--result-filename (vLLM's names)")
    parser.add_argument("--result-dir", default=".", help="with --save-result: the directory")
    parser.add_argument("--result-filename", default=None,
                        help="with --save-result: the file name (default BACKEND-RATEqps-MODEL-DATE.json)")
    parser.add_argument("--percentile-metrics", default=",".join(DEFAULT_PERCENTILE_METRICS),
                        help="report sections, comma-separated: ttft,tpot,itl,e2el")
    parser.add_argument("--metric-percentiles", default="99", help="percentiles reported, e.g. 50,90,99")
    parser.add_argument("--label", default=None, help="free-form name stored in the JSON result")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--metrics-url", action="append", default=None,
                        help="Prometheus endpoint scraped before and after the run for the speculative-decoding "
                             "counters (repeatable; default: BASE_URL/metrics; under `glmserve up` give each decode "
                             "worker's http://HOST:HTTP_PORT/metrics)")


def _load_tokenizer(path: str | None) -> TextTokenizer | None:
    if path is None:
        return None
    from glmserve.engine.tokenizer import Tokenizer  # imported lazily: only needed with --tokenizer

    return Tokenizer(path)


def build_requests(args: argparse.Namespace, tokenizer: TextTokenizer | None) -> list[SampleRequest]:
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if args.dataset == "random-mm":
        return random_mm_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                                  args.random_range_ratio, args.seed, args.random_mm_base_items_per_request,
                                  args.random_mm_num_mm_items_range_ratio,
                                  parse_image_limit(args.random_mm_limit_mm_per_prompt),
                                  parse_buckets(args.random_mm_bucket_config), tokenizer)
    if args.dataset == "random":
        return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.seed, tokenizer)
    if args.dataset == "prefix-repetition":
        suffix = args.prefix_repetition_suffix_len
        output = args.prefix_repetition_output_len
        return prefix_repetition_requests(args.num_prompts, args.prefix_len, args.num_prefixes,
                                          args.random_input_len if suffix is None else suffix,
                                          args.random_output_len if output is None else output, args.seed, tokenizer)
    if args.dataset_path is None:
        raise ValueError("--dataset sharegpt needs --dataset-path")
    return sharegpt_requests(args.dataset_path, args.num_prompts, args.seed, tokenizer, args.sharegpt_output_len)


async def _send_all(args: argparse.Namespace,
                    requests: Sequence[SampleRequest]) -> tuple[list[RequestOutput], float]:
    url = args.base_url.rstrip("/") + args.endpoint
    # limit=0: aiohttp's default pool of 100 connections would silently cap concurrency.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=_READ_TIMEOUT_S)
    # read_bufsize: one SSE line (a chunk with many token ids) may exceed the 64 KiB default.
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=2**20) as session:
        async def send(req: SampleRequest) -> RequestOutput:
            payload = build_payload(args.endpoint, args.model, req, args.temperature, args.ignore_eos)
            return await send_request(session, url, payload)

        return await drive(requests, send, args.request_rate, args.max_concurrency, args.seed, args.disable_tqdm)


def _fit_to_server(args: argparse.Namespace) -> None:
    """Read the server's max_model_len and fit the random/prefix-repetition lengths to it (fails fast)."""
    if args.dataset == "sharegpt":
        return
    limit = server_max_model_len(args.base_url, args.model)
    prefix = args.prefix_len + 1 if args.dataset == "prefix-repetition" else 0
    args.random_input_len, args.random_output_len = fit_lengths(
        args.random_input_len, args.random_output_len, limit, args.tokenizer is not None,
        args.random_range_ratio if args.dataset in ("random", "random-mm") else 0.0, prefix)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark and prints the report; 1 when no request succeeded (or arguments are bad)."""
    try:
        normalize_options(args)
        _fit_to_server(args)
        tokenizer = _load_tokenizer(args.tokenizer)
        requests = build_requests(args, tokenizer)
    except (ValueError, OSError) as exc:
        print(f"glmserve bench: {exc}", file=sys.stderr)
        return 1
    print(f"Sending {len(requests)} requests to {args.base_url.rstrip('/')}{args.endpoint} "
          f"(request rate {args.request_rate}, max concurrency {args.max_concurrency})")
    metrics_urls = args.metrics_url or [args.base_url.rstrip("/") + "/metrics"]
    spec_before, scrape_errors = scrape_spec_decode(metrics_urls)
    try:
        outputs, duration = asyncio.run(_send_all(args, requests))
    except ValueError as exc:  # bad --request-rate / --max-concurrency, found by the driver
        print(f"glmserve bench: {exc}", file=sys.stderr)
        return 1
    spec_after, more_errors = scrape_spec_decode(metrics_urls)
    if args.metrics_url:  # asked for explicitly: say which could not be read (the default may not exist)
        for error in dict.fromkeys(scrape_errors + more_errors):
            print(f"glmserve bench: --metrics-url {error}", file=sys.stderr)
    spec = (spec_after - spec_before).summary() if spec_before is not None and spec_after is not None else None
    metrics = compute_metrics(requests, outputs, duration, tokenizer, args.percentiles)
    print(format_report(metrics, args.max_concurrency, args.request_rate, args.sections))
    if spec is not None:
        print("\n".join(format_spec_decode(spec, WIDTH) + ["=" * WIDTH]))
    first_error = next((o.error for o in outputs if not o.success), None)
    if first_error:
        print(f"first error: {first_error}", file=sys.stderr)
    if args.result_file:
        Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
        arguments = {k: v for k, v in vars(args).items() if not callable(v)}  # drop a wired-in handler
        result = build_result(metrics, outputs, arguments, args.label)
        result["spec_decode"] = spec  # None when the servers export no speculative-decoding counters
        write_result(args.result_file, result)
        print(f"result written to {args.result_file}")
    return 0 if metrics.completed else 1
