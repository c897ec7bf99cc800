"""Request migration: continue a request on another worker after the one streaming it failed.

The new attempt's prompt is the original prompt plus every token the caller already received, and
`resumed_output_tokens` tells the worker those trailing tokens are output (max_tokens, min_tokens and
penalties count them; a seeded generator is advanced past their draws), so the continuation is what
one undisturbed worker would have produced: no gap, no duplicate, same greedy and seeded tokens.
"""

from __future__ import annotations

import asyncio

import grpc

from glmserve.engine.sampling_params import SamplingParams

# While a stream is silent this long, the router checks whether its worker is still in the pool.
STALL_CHECK_S = 0.5


class WorkerStalled(Exception):
    """The worker streaming a request left the pool (missed polls, e.g. SIGSTOP) while the stream was silent."""


def resumed_params(params: SamplingParams, streamed: list[int]) -> SamplingParams:
    p = params.clone()
    p.resumed_output_tokens = params.resumed_output_tokens + len(streamed)
    return p


def can_resume(params: SamplingParams) -> bool:
    """Grammar and bad-words matchers start at the first output token and are not fed earlier output:
    such a request is retried only before its first token reaches the caller."""
    return getattr(params, "structured_output", None) is None and not getattr(params, "bad_words_token_ids", None)


def nothing_left(params: SamplingParams, prompt_len: int, streamed: list[int], max_model_len: int) -> bool:
    """The tokens already streamed used up max_tokens or the context: the request is done (length)."""
    done = params.resumed_output_tokens + len(streamed)
    return (params.max_tokens is not None and done >= params.max_tokens) or prompt_len + len(streamed) >= max_model_len


async def next_chunk(call, still_healthy) -> object:
    """The stream's next message (grpc.aio.EOF at its end), giving up when still_healthy() turns false
    while the worker says nothing, so a frozen worker does not hold the request until its timeout."""
    read = asyncio.ensure_future(call.read())
    while True:
        done, _ = await asyncio.wait({read}, timeout=STALL_CHECK_S)
        if done:
            return read.result()
        if not still_healthy():
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)
            raise WorkerStalled()


