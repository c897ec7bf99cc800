"""Routes for clients of other servers: vLLM's /tokenize and /detokenize, LightLLM's /get_model_name,
Anthropic's /v1/messages (Claude Code and other agents), and `--api-key` on all of them."""

from __future__ import annotations

from typing import Awaitable, Callable

from fastapi import FastAPI, Request

from glmserve.router.anthropic_protocol import CountTokensRequest, MessagesRequest
from glmserve.router.backend import BackendError
from glmserve.router.errors import APIError
from glmserve.router.serving_anthropic import AnthropicHandler, error_response
from glmserve.router.serving_chat import ChatHandler
from glmserve.router.serving_tokenize import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest, \
    detokenize, tokenize
from glmserve.router.state import RouterState


async def _tokenize_body(request: Request, json_body: Callable[..., Awaitable]):
    """The chat form when the body has `messages`, else the prompt form (as vLLM decides)."""
    import json

    try:
        has_messages = "messages" in json.loads(await request.body())
    except (ValueError, TypeError):
        has_messages = False  # json_body reports the malformed body
    return await json_body(request, TokenizeChatRequest if has_messages else TokenizeCompletionRequest)


def add_compat_routes(app: FastAPI, state: RouterState, chat: ChatHandler,
                      json_body: Callable[..., Awaitable]) -> None:
    if state.config.api_key:
        from glmserve.router.auth import install_api_key

        install_api_key(app, state.config.api_key)
    anthropic = AnthropicHandler(state, chat)

    @app.post("/tokenize")
    async def vllm_tokenize(request: Request):
        return tokenize(state, await _tokenize_body(request, json_body))

    @app.post("/detokenize")
    async def vllm_detokenize(request: Request):
        return detokenize(state, await json_body(request, DetokenizeRequest))

    @app.get("/get_model_name")
    @app.post("/get_model_name")
    async def lightllm_model_name():
        return {"model_name": state.config.served_model_name}

    @app.post("/v1/messages")
    async def anthropic_messages(request: Request):
        try:
            return await anthropic.messages(await json_body(request, MessagesRequest), request)
        except APIError as exc:  # Anthropic clients expect their own error shape
            return error_response(exc.status, exc.message)
        except BackendError as exc:
            return error_response(exc.status, str(exc))

    @app.post("/v1/messages/count_tokens")
    async def anthropic_count_tokens(request: Request):
        try:
            return anthropic.count_tokens(await json_body(request, CountTokensRequest))
        except APIError as exc:
            return error_response(exc.status, exc.message)
