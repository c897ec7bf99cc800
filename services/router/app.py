"""The router's HTTP front: OpenAI API, LightLLM endpoints, health and metrics."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from glmserve.router.errors import APIError, error_response, install_error_handlers
from glmserve.router.input_limits import read_json_object
from glmserve.router.openapi import install_openapi
from glmserve.router.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from glmserve.router.serving_chat import ChatHandler
from glmserve.router.serving_completions import CompletionHandler
from glmserve.router.serving_generate import GenerateHandler
from glmserve.router.state import RouterState


async def _json_body(request: Request, model):
    """Parse and validate a body ourselves so malformed JSON is a 400 with a clear message."""
    data = await read_json_object(request)  # size, depth, Unicode and integer-range limits
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())) or None
        raise APIError(400, f"{param or 'body'}: {err.get('msg')}", param=param) from exc


def create_app(state: RouterState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await state.backend.start()
        try:
            yield
        finally:
            await state.backend.stop()

    app = FastAPI(title="glmserve router", lifespan=lifespan)
    install_error_handlers(app)
    install_openapi(app)
    chat, completions, generate = ChatHandler(state), CompletionHandler(state), GenerateHandler(state)
    started = int(time.time())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat.handle(await _json_body(request, ChatCompletionRequest), request)

    @app.post("/v1/completions")
    async def text_completions(request: Request):
        return await completions.handle(await _json_body(request, CompletionRequest), request)

    @app.post("/generate")
    async def lightllm_generate(request: Request):
        return await generate.generate(await _json_body(request, GenerateRequest), request)

    @app.post("/generate_stream")
    async def lightllm_generate_stream(request: Request):
        return await generate.generate_stream(await _json_body(request, GenerateRequest), request)

    from glmserve.router.app_compat import add_compat_routes

    add_compat_routes(app, state, chat, _json_body)

    @app.get("/v1/models")
    async def models():
        info = state.backend.model_info()
        return {"object": "list", "data": [{"id": state.config.served_model_name, "object": "model",
                                            "created": started, "owned_by": "glmserve",
                                            "max_model_len": info.max_model_len}]}

    @app.get("/health")
    async def health():
        if state.backend.healthy():
            return {"status": "ok"}
        return error_response(503, "no healthy prefill/decode workers")

    @app.get("/ready")
    async def ready():
        """Readiness: the router can route now (a prefill and a decode worker are in its pool)."""
        if state.backend.healthy():
            return {"status": "ready"}
        return error_response(503, "not ready: no healthy prefill/decode workers")

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/load")
    async def load():
        describe = getattr(state.backend, "describe", None)
        return JSONResponse(describe() if describe else {})

    return app
