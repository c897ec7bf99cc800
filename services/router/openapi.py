"""/openapi.json: the request bodies and responses of every OpenAI and LightLLM endpoint.

The handlers read their bodies themselves (for clear 400s), so FastAPI cannot see them; this module
declares the same pydantic request models, plus response models, in the document, so fuzzers and
client generators learn the API from it.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from glmserve.router.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class ToolCallFunction(BaseModel):
    name: str | None = None
    arguments: str


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: dict[str, Any] | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: dict[str, Any] | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class GenerateResponse(BaseModel):
    """LightLLM /generate: generated_text is a list; the other fields are scalars for one sequence and
    lists (one entry per sequence) for n > 1."""

    generated_text: list[str]
    count_output_tokens: int | list[int]
    finish_reason: str | None | list[str | None]
    prompt_tokens: int
    tokens: list[Any] | None = None


class Status(BaseModel):
    status: str


# One server-sent event: `data: <JSON chunk>`, the last one `data: [DONE]`; a failure after the 200 is
# an `{"error": {...}}` event (the ErrorResponse shape) before [DONE].
SSE = {"text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}},
                                        "required": ["data"],
                                        "description": "server-sent event: a JSON chunk, an error object, "
                                                       "or [DONE]"}}}

# path -> (request model or None, 200 response model, streams too)
ENDPOINTS: dict[str, tuple[type[BaseModel] | None, type[BaseModel], bool]] = {
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse, True),
    "/v1/completions": (CompletionRequest, CompletionResponse, True),
    "/generate": (GenerateRequest, GenerateResponse, False),
    "/generate_stream": (GenerateRequest, GenerateResponse, True),
    "/v1/models": (None, ModelList, False),
    "/health": (None, Status, False),
    "/ready": (None, Status, False),
}
ERRORS = {"400": "invalid request", "404": "unknown model", "405": "method not allowed",
          "408": "request timed out", "413": "body too large", "503": "no healthy worker"}


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _add_schema(schemas: dict, model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version="1", routes=app.routes,
                          description="OpenAI-compatible and LightLLM-compatible API of the glmserve router.")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        _add_schema(schemas, ErrorResponse)
        for path, (request, response, streams) in ENDPOINTS.items():
            for op in (doc["paths"].get(path) or {}).values():
                _add_schema(schemas, response)
                content = {"application/json": {"schema": _ref(response)}}
                if path == "/generate_stream":
                    content = dict(SSE)
                elif streams:
                    content.update(SSE)
                op["responses"] = {"200": {"description": "OK", "content": content}}
                for code, what in ERRORS.items():
                    if request is None and code in ("400", "404", "413"):
                        continue
                    op["responses"][code] = {"description": what,
                                             "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
                if request is not None:
                    _add_schema(schemas, request)
                    op["requestBody"] = {"required": True,
                                         "content": {"application/json": {"schema": _ref(request)}}}
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
