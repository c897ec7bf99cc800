"""What the router refuses before it parses a request any further: oversized bodies, JSON nested too
deeply, strings that are not valid Unicode, integers no field can hold, and more work than the
deployment's KV cache can ever hold. Each is an OpenAI-style 4xx naming the offending param."""

from __future__ import annotations

import json

from fastapi import Request

from glmserve.router.errors import APIError
from glmserve.router.protocol import MAX_N

MAX_BODY_BYTES = 32 << 20  # far above any prompt that fits a context window
MAX_JSON_DEPTH = 64  # chat messages, tools and their JSON schemas stay far below this
INT64 = (-(1 << 63), (1 << 63) - 1)


async def read_json_object(request: Request) -> dict:
    raw = await _read_limited(request)
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"JSON body nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise APIError(400, "the JSON body must be an object")
    check_values(data)
    return data


async def _read_limited(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"request body of {int(declared)} bytes is over the limit of {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_values(data: dict) -> None:
    """Walk the parsed body once (iteratively: no recursion to exhaust): depth, lone surrogates, int64."""
    stack: list[tuple[object, tuple, int]] = [(data, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_JSON_DEPTH:
                raise APIError(400, f"JSON body nested deeper than {MAX_JSON_DEPTH} levels", param=_param(path))
            stack.extend((v, path + (k,), depth + 1) for k, v in value.items())
            stack.extend((k, path + (k,), depth + 1) for k in value)  # keys are strings to check too
        elif isinstance(value, list):
            if depth > MAX_JSON_DEPTH:
                raise APIError(400, f"JSON body nested deeper than {MAX_JSON_DEPTH} levels", param=_param(path))
            stack.extend((v, path + (i,), depth + 1) for i, v in enumerate(value))
        elif isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise APIError(400, "string is not valid Unicode (lone surrogate escape such as \\ud800)",
                                   param=_param(path)) from None
        elif isinstance(value, int) and not isinstance(value, bool):
            if not INT64[0] <= value <= INT64[1]:
                raise APIError(400, f"integer {value} is out of range (signed 64-bit)", param=_param(path))


def _param(path: tuple) -> str | None:
    return ".".join(str(p) for p in path) or None


def check_capacity(n: int, prompt_len: int, max_tokens: int | None, capacity_tokens: int | None,
                   param: str = "n") -> None:
    """n choices of prompt + max_tokens tokens must fit the deployment's KV cache at once, or the request
    could never finish; refuse it up front instead of letting it wait and fail later."""
    if n > MAX_N:
        raise APIError(400, f"n must be at most {MAX_N}, got {n}", param=param)
    if capacity_tokens is None or max_tokens is None:
        return
    need = n * (prompt_len + max_tokens)
    if need > capacity_tokens:
        raise APIError(400, f"n x (prompt + max_tokens) = {n} x ({prompt_len} + {max_tokens}) = {need} tokens "
                            f"exceeds the KV cache capacity of this deployment ({capacity_tokens} tokens): "
                            f"lower n or max_tokens", param=param)
