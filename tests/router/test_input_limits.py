"""Input limits without a server: the body walk (depth, Unicode, int64), the capacity check, and the
SSE wrapper that ends a failing stream with an OpenAI-shaped error event instead of cutting it off."""

from __future__ import annotations

import asyncio
import json

import pytest

from glmserve.metrics import ServiceMetrics
from glmserve.router.errors import APIError
from glmserve.router.input_limits import MAX_JSON_DEPTH, check_capacity, check_values
from glmserve.router.serving_common import stream_with_timeout


def test_walk_names_the_offending_param():
    with pytest.raises(APIError) as info:
        check_values({"messages": [{"role": "user", "content": "ok"}, {"content": "x\udc80"}]})
    assert info.value.status == 400 and info.value.param == "messages.1.content"
    with pytest.raises(APIError) as info:
        check_values({"parameters": {"seed": 1 << 64}})
    assert info.value.param == "parameters.seed"
    with pytest.raises(APIError, match="nested deeper"):
        check_values(json.loads('{"a": ' + "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH + "}"))
    check_values(json.loads('{"a": ' + "[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2) + "}"))
    check_values({"seed": -(1 << 63), "ok": "ünïcødé 🙂", "flag": True})


def test_capacity_check():
    check_capacity(4, 10, 90, capacity_tokens=400)
    with pytest.raises(APIError, match="lower n or max_tokens") as info:
        check_capacity(5, 10, 90, capacity_tokens=400)
    assert info.value.param == "n"
    check_capacity(128, 10, 90, capacity_tokens=None)  # unknown capacity: only the cap on n
    with pytest.raises(APIError, match="at most 128"):
        check_capacity(129, 1, 1, capacity_tokens=None)


def test_a_stream_that_fails_after_its_200_ends_with_an_error_event():
    async def events():
        yield "data: {}\n\n"
        raise ValueError("Value out of range")

    async def collect():
        return [e async for e in stream_with_timeout(events(), None, ServiceMetrics("router", "m"))]

    out = asyncio.run(collect())
    assert out[0] == "data: {}\n\n" and out[-1] == "data: [DONE]\n\n"
    err = json.loads(out[1][len("data: "):])["error"]
    assert err["code"] == "500" and "Value out of range" in err["message"] and set(err) == {"message", "type", "param", "code"}
