"""`--api-key`: every request but liveness and metrics must carry the key, as vLLM's --api-key does.

OpenAI clients send `Authorization: Bearer KEY`; Anthropic clients (Claude Code) send `x-api-key: KEY` or,
with ANTHROPIC_AUTH_TOKEN, a Bearer token. Either is accepted; anything else is a 401."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request

from glmserve.router.errors import error_response

# Probes, Prometheus and the launcher's readiness check (/load: worker counts, no model access) need no key.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/load"})  # probes and scrapes carry no key


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return request.headers.get("x-api-key")


def install_api_key(app: FastAPI, api_key: str) -> None:
    expected = api_key.encode()

    @app.middleware("http")
    async def _check_key(request: Request, call_next):
        if request.url.path in OPEN_PATHS or request.method == "OPTIONS":
            return await call_next(request)
        key = presented_key(request)
        if key is None or not hmac.compare_digest(key.encode(), expected):
            return error_response(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                                  code="invalid_api_key")
        return await call_next(request)
