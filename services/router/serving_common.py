"""What chat, completions and /generate share: running n choices, SSE framing, usage, logprobs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import Request

from glmserve.engine.sampled_token import SampledToken
from glmserve.engine.sampling_params import SamplingParams
from glmserve.metrics import ServiceMetrics
from glmserve.router.backend import BackendError, GenerationBackend
from glmserve.router.choice_stream import ChoiceDelta, ChoiceStream
from glmserve.router.errors import APIError, error_body
from glmserve.router.input_limits import check_capacity


log = logging.getLogger(__name__)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


@dataclass
class RequestTiming:
    """Per-request latency bookkeeping for the router's histograms."""

    metrics: ServiceMetrics
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None

    def on_tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
            self.metrics.get("time_to_first_token_seconds").observe(now - self.arrival)
        elif self.last_token is not None:
            self.metrics.get("inter_token_latency_seconds").observe((now - self.last_token) / n)
        self.last_token = now
        self.metrics.get("generation_tokens").inc(n)

    def on_finish(self, reasons: list[str | None]) -> None:
        self.metrics.get("e2e_request_latency_seconds").observe(time.monotonic() - self.arrival)
        for r in reasons:
            self.metrics.get("request_success", finished_reason=r or "unknown").inc()


@dataclass
class ChoiceRun:
    """All choices of one request, merged into one ordered stream of (choice index, delta)."""

    backend: GenerationBackend
    request_id: str
    prompt_token_ids: list[int]
    make_stream: Callable[[int], ChoiceStream]
    params: list[SamplingParams]
    timing: RequestTiming
    num_cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str | None] = field(default_factory=list)
    mm: object = None  # the prompt's images (vision models), passed to the backend with every choice

    def __post_init__(self) -> None:
        first = self.params[0] if self.params else None
        check_capacity(len(self.params), len(self.prompt_token_ids), first and first.max_tokens,
                       self.backend.capacity_tokens())

    async def _one(self, index: int, queue: asyncio.Queue) -> None:
        extra = {"mm": self.mm} if self.mm is not None else {}
        stream = self.backend.generate(f"{self.request_id}-{index}", self.prompt_token_ids, self.params[index], **extra)
        choice = self.make_stream(index)
        try:
            async for delta in stream:
                self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
                out = choice.push(delta)
                await queue.put((index, out))
                if choice.finished:
                    break
            if not choice.finished:
                raise BackendError("the worker stream ended without finishing the request", retriable=True)
        except BaseException as exc:
            await queue.put((index, exc))
            raise
        finally:
            await stream.aclose()

    async def deltas(self) -> AsyncIterator[tuple[int, ChoiceDelta]]:
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._one(i, queue)) for i in range(len(self.params))]
        self.finish_reasons = [None] * len(tasks)
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    if isinstance(item, asyncio.CancelledError):
                        continue
                    if isinstance(item, BackendError):
                        self.timing.metrics.get("request_failure", error="backend").inc()
                    raise item
                self.completion_tokens += len(item.token_ids)
                self.timing.on_tokens(len(item.token_ids))
                if item.finish_reason is not None:
                    self.finish_reasons[index] = item.finish_reason
                    remaining -= 1
                yield index, item
            self.timing.on_finish(self.finish_reasons)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def usage(self) -> dict:
        n_prompt = len(self.prompt_token_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": n_prompt + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}


async def collect_until_disconnect(run: ChoiceRun, raw: Request | None, timeout: float | None
                                   ) -> list[tuple[int, ChoiceDelta]]:
    """Gather a non-streaming request's deltas; a client that leaves or a timeout cancels it."""

    async def gather():
        return [item async for item in run.deltas()]

    task = asyncio.create_task(gather())
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if raw is not None and await raw.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
            if deadline is not None and time.monotonic() > deadline:
                task.cancel()
                run.timing.metrics.get("request_failure", error="timeout").inc()
                raise APIError(408, f"request timed out after {timeout:.0f}s")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def stream_with_timeout(events: AsyncIterator[str], timeout: float | None,
                              metrics: ServiceMetrics) -> AsyncIterator[str]:
    """SSE body wrapper: a timeout or a worker error becomes an error event, then [DONE]."""
    try:
        if timeout is None:
            async for e in events:
                yield e
        else:
            async with asyncio.timeout(timeout):
                async for e in events:
                    yield e
    except TimeoutError:
        metrics.get("request_failure", error="timeout").inc()
        yield sse(error_body(408, f"request timed out after {timeout:.0f}s"))
        yield sse("[DONE]")
    except BackendError as exc:  # counted where it was raised (ChoiceRun)
        yield sse(error_body(exc.status, str(exc)))
        yield sse("[DONE]")
    except APIError as exc:
        yield sse(error_body(exc.status, exc.message, exc.param))
        yield sse("[DONE]")
    except Exception as exc:  # anything else: the client still gets an error event, never a cut-off body
        log.exception("stream failed")
        metrics.get("request_failure", error="backend").inc()
        yield sse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"))
        yield sse("[DONE]")


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer, tokens: list[SampledToken]) -> dict:
    def entry(tid: int, lp: float) -> dict:
        t = token_text(tokenizer, tid)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    content = []
    for tok in tokens:
        e = entry(tok.token_id, tok.logprob)
        e["top_logprobs"] = [entry(tid, lp) for tid, lp in (tok.top_logprobs or [])]
        content.append(e)
    return {"content": content}


def completion_logprobs(tokenizer, tokens: list[SampledToken], text_offset_start: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_offset_start
    for tok in tokens:
        t = token_text(tokenizer, tok.token_id)
        out["tokens"].append(t)
        out["token_logprobs"].append(tok.logprob)
        out["top_logprobs"].append({token_text(tokenizer, tid): lp for tid, lp in (tok.top_logprobs or [])})
        out["text_offset"].append(offset)
        offset += len(t)
    return out
