"""POST /v1/messages (Anthropic Messages API) and POST /v1/messages/count_tokens.

A request is translated into the equivalent chat-completions request (anthropic_protocol) and run by the
chat handler, so validation, the chat template, the reasoning and tool-call parsers and every sampling
check are the same code; its OpenAI-shaped answer is then rewritten into Anthropic's message, or its
chunk stream into Anthropic's events (message_start, content_block_start/delta/stop, message_delta,
message_stop). Errors use Anthropic's shape: {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from glmserve.router.anthropic_protocol import (CountTokensRequest, MessagesRequest, chat_messages, chat_request,
                                                chat_tools, template_kwargs)
from glmserve.router.errors import APIError
from glmserve.router.protocol import ChatCompletionRequest
from glmserve.router.serving_chat import ChatHandler
from glmserve.router.state import RouterState

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_json(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_json(status, message), status_code=status)


def _event(name: str, payload: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


def stop_fields(finish_reason: str | None, stop_reason: Any, stop_sequences: list[str] | None) -> tuple[str, Any]:
    """(stop_reason, stop_sequence) from the chat choice's finish_reason and matched stop string."""
    if finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(stop_reason, str) and stop_reason in (stop_sequences or []):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _tool_input(arguments: str) -> dict:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {"_unparsed_arguments": arguments}  # the model wrote something that is not JSON; keep it visible
    return value if isinstance(value, dict) else {"value": value}


class AnthropicHandler:
    def __init__(self, state: RouterState, chat: ChatHandler):
        self.state = state
        self.chat = chat

    async def messages(self, body: MessagesRequest, raw: Request):
        chat_body = ChatCompletionRequest.model_validate(chat_request(body, body.stream))
        response = await self.chat.handle(chat_body, raw)
        if body.stream:
            return StreamingResponse(self._events(response.body_iterator, body), media_type="text/event-stream")
        return JSONResponse(self._message(json.loads(response.body), body))

    def count_tokens(self, body: CountTokensRequest) -> dict:
        st = self.state
        st.check_model(body.model)
        try:
            prompt = st.tokenizer.apply_chat_template(chat_messages(body.system, body.messages),
                                                      tools=chat_tools(body.tools), add_generation_prompt=True,
                                                      **(template_kwargs(body.thinking) or {}))
        except Exception as exc:  # template errors are the caller's input problem
            raise APIError(400, f"could not render the chat template: {exc}", param="messages") from exc
        return {"input_tokens": len(st.tokenizer.encode(prompt))}

    # -- non-streaming --------------------------------------------------------------------------
    def _message(self, resp: dict, body: MessagesRequest) -> dict:
        choice = resp["choices"][0]
        msg = choice["message"]
        content: list[dict] = []
        if msg.get("reasoning_content"):
            content.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
        if msg.get("content"):
            content.append({"type": "text", "text": msg["content"]})
        for call in msg.get("tool_calls") or []:
            content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                            "input": _tool_input(call["function"]["arguments"])})
        reason, sequence = stop_fields(choice["finish_reason"], choice.get("stop_reason"), body.stop_sequences)
        usage = resp["usage"]
        return {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
                "model": resp["model"], "content": content, "stop_reason": reason, "stop_sequence": sequence,
                "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}}

    # -- streaming ------------------------------------------------------------------------------
    async def _events(self, chunks: AsyncIterator[str], body: MessagesRequest) -> AsyncIterator[str]:
        stream = _EventWriter(self.state.config.served_model_name, body.stop_sequences)
        async for text in chunks:
            for line in text.splitlines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    for e in stream.finish():
                        yield e
                    return
                for e in stream.push(json.loads(data)):
                    yield e
                if stream.failed:
                    return


class _EventWriter:
    """Chat chunks in, Anthropic events out. One content block is open at a time: thinking, text, or one
    tool_use per tool call; a change of kind closes the open block and starts the next index."""

    def __init__(self, model: str, stop_sequences: list[str] | None):
        self.model = model
        self.stop_sequences = stop_sequences
        self.started = False
        self.failed = False
        self.index = -1
        self.open_kind: str | None = None
        self.open_call: int | None = None
        self.stop: tuple[str, Any] = ("end_turn", None)
        self.output_tokens = 0

    def _start(self, chunk: dict) -> list[str]:
        self.started = True
        message = {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant",
                   "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": len(chunk.get("prompt_token_ids") or []), "output_tokens": 0}}
        return [_event("message_start", {"type": "message_start", "message": message}),
                _event("ping", {"type": "ping"})]

    def _close(self) -> list[str]:
        out = []
        if self.open_kind == "thinking":  # our thoughts are not signed; the field is present and empty
            out.append(_event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                      "delta": {"type": "signature_delta", "signature": ""}}))
        if self.open_kind is not None:
            out.append(_event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        self.open_kind, self.open_call = None, None
        return out

    def _open(self, kind: str, block: dict, call: int | None = None) -> list[str]:
        out = self._close()
        self.index += 1
        self.open_kind, self.open_call = kind, call
        out.append(_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block}))
        return out

    def _delta(self, delta: dict) -> str:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def push(self, chunk: dict) -> list[str]:
        if "error" in chunk:  # a failure after the stream began: Anthropic's error event ends it
            self.failed = True
            err = chunk["error"]
            status = int(err.get("code") or 500) if str(err.get("code", "")).isdigit() else 500
            return [_event("error", error_json(status, err.get("message", "error")))]
        out = [] if self.started else self._start(chunk)
        if chunk.get("usage"):
            self.output_tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self.open_kind != "thinking":
                    out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out.append(self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
            if delta.get("content"):
                if self.open_kind != "text":
                    out += self._open("text", {"type": "text", "text": ""})
                out.append(self._delta({"type": "text_delta", "text": delta["content"]}))
            for call in delta.get("tool_calls") or []:
                if call.get("id") is not None or self.open_call != call["index"]:
                    fn = call.get("function") or {}
                    out += self._open("tool_use", {"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                                                   "input": {}}, call["index"])
                arguments = (call.get("function") or {}).get("arguments")
                if arguments:
                    out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
            if choice.get("finish_reason") is not None:
                self.stop = stop_fields(choice["finish_reason"], choice.get("stop_reason"), self.stop_sequences)
        return out

    def finish(self) -> list[str]:
        out = self._close()
        reason, sequence = self.stop
        out.append(_event("message_delta", {"type": "message_delta",
                                            "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                            "usage": {"output_tokens": self.output_tokens}}))
        out.append(_event("message_stop", {"type": "message_stop"}))
        return out
