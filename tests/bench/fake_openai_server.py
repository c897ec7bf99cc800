"""A tiny OpenAI-style streaming server for the benchmark client's tests, run in a thread on a loopback port.

The request's `model` picks a behaviour: "ok" streams max_tokens one-word chunks; "flaky" answers
HTTP 500 to every 4th request; "truncate" drops the connection before `data: [DONE]`; "midstream-error"
sends an error event after one token; "no-done" ends after the finish_reason and usage chunks without
`data: [DONE]`, as transformers' server does. It records the peak number of requests in flight."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

TOKEN_DELAY_S = 0.002


class FakeServerState:
    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.payloads: list[dict[str, Any]] = []


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def create_app(state: FakeServerState) -> FastAPI:
    app = FastAPI()

    async def stream(body: dict[str, Any], chat: bool) -> AsyncIterator[bytes]:
        state.in_flight += 1
        state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
        try:
            n = int(body.get("max_tokens", 4))
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            if chat:  # the role-only opening chunk carries no token
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            for i in range(n):
                await asyncio.sleep(TOKEN_DELAY_S)
                piece = f"w{i} "
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                yield _sse({"choices": [choice]})
                if body["model"] == "midstream-error":
                    yield _sse({"error": {"message": "decode worker lost", "code": 503}})
                    return
            if body["model"] == "truncate":
                return
            finish = {"index": 0, "delta": {}, "finish_reason": "length"} if chat else \
                {"index": 0, "text": "", "finish_reason": "length"}
            yield _sse({"choices": [finish]})
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                     "total_tokens": len(prompt.split()) + n}
            yield _sse({"choices": [], "usage": usage})
            if body["model"] != "no-done":
                yield b"data: [DONE]\n\n"
        finally:
            state.in_flight -= 1

    async def handle(request: Request, chat: bool):
        body = await request.json()
        state.requests += 1
        state.payloads.append(body)
        if body["model"] == "flaky" and state.requests % 4 == 0:
            return JSONResponse({"error": {"message": "injected failure", "code": 500}}, status_code=500)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


class FakeServer:
    """Context manager: serves on 127.0.0.1 (a socket bound before start, so no port race)."""

    def __init__(self) -> None:
        self.state = FakeServerState()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(self.state), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "FakeServer":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
