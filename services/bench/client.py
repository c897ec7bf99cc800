"""One streaming OpenAI request, timed: TTFT, inter-token gaps, end-to-end latency, usage.

Times come from time.perf_counter(). A chunk counts as carrying tokens when it brings generated text
(content, reasoning_content, or completion text) or token ids; role-only and usage-only chunks do not.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from glmserve.bench.datasets import SampleRequest

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
_ERROR_TEXT_LIMIT = 500


@dataclass
class RequestOutput:
    success: bool = False
    error: str = ""
    generated_text: str = ""
    ttft: float = 0.0  # seconds from sending to the first token-carrying chunk
    itl: list[float] = field(default_factory=list)  # seconds between consecutive token-carrying chunks
    latency: float = 0.0  # seconds from sending to the end of the stream
    start_time: float = 0.0
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    token_chunks: int = 0


def build_payload(endpoint: str, model: str, request: SampleRequest, temperature: float,
                  ignore_eos: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": request.output_len,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == CHAT_ENDPOINT and request.images:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in request.images]
        payload["messages"] = [{"role": "user", "content": parts + [{"type": "text", "text": request.prompt}]}]
    elif endpoint == CHAT_ENDPOINT:
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        payload["prompt"] = request.prompt
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload


def _chunk_text(chunk: dict[str, Any]) -> tuple[str, bool]:
    """(text, carries tokens) for one streamed chunk of either endpoint."""
    choices = chunk.get("choices") or []
    if not choices:
        return "", False
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):  # chat completions
        text = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
        has_tool = bool(delta.get("tool_calls"))
    else:
        text, has_tool = choice.get("text") or "", False
    has_ids = bool(choice.get("token_ids"))
    return text, bool(text) or has_tool or has_ids


def _error_text(body: str, status: int) -> str:
    return f"HTTP {status}: {body.strip()[:_ERROR_TEXT_LIMIT]}"


async def send_request(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> RequestOutput:
    out = RequestOutput()
    start = out.start_time = time.perf_counter()
    last_token_time: float | None = None
    parts: list[str] = []
    done = False
    finished = False  # a choice reported finish_reason
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                out.error = _error_text(await resp.text(), resp.status)
                return out
            async for raw in resp.content:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments, event/id fields
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:  # servers report mid-stream failures as an error event
                    err = chunk["error"]
                    out.error = str(err.get("message", err) if isinstance(err, dict) else err)
                    return out
                now = time.perf_counter()
                text, has_tokens = _chunk_text(chunk)
                finished = finished or any(c.get("finish_reason") for c in chunk.get("choices") or [])
                if has_tokens:
                    if last_token_time is None:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last_token_time)
                    last_token_time = now
                    out.token_chunks += 1
                    parts.append(text)
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    out.usage_prompt_tokens = usage.get("prompt_tokens")
                    out.usage_completion_tokens = usage.get("completion_tokens")
        out.latency = time.perf_counter() - start
        out.generated_text = "".join(parts)
        # Some servers (transformers') end the stream after the finish_reason chunk without `data: [DONE]`;
        # a stream cut before any finish_reason is still a failure.
        if not (done or finished):
            out.error = "stream closed before data: [DONE] or a finish_reason"
        elif last_token_time is None:
            out.error = "stream ended without any token"
        else:
            out.success = True
    except Exception as exc:  # a benchmark records every failure and carries on
        out.error = f"{type(exc).__name__}: {exc}"
    return out
