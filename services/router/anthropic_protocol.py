"""Anthropic Messages API request bodies, and their translation into our chat-completions request.

The translation is the whole mapping: system prompt -> a system message; text blocks -> content;
`tool_use` blocks -> assistant tool_calls; `tool_result` blocks -> tool messages; `thinking` blocks ->
reasoning_content (the GLM template keeps or drops it); `tools` (name, description, input_schema) -> function
tools; `tool_choice` auto/any/tool/none -> auto/required/named/none; `thinking` enabled/disabled -> the
template's enable_thinking; stop_sequences -> stop.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from glmserve.router.errors import APIError


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. cache_control on blocks: caching is automatic here


class TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Lenient):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Lenient):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, list[dict[str, Any]], None] = None
    is_error: bool = False


class ThinkingBlock(_Lenient):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Lenient):
    type: Literal["redacted_thinking"]
    data: str = ""


class OtherBlock(_Lenient):
    type: str  # image, document, ...: refused with a 400 naming the type


_KNOWN_BLOCKS = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


def _block_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in _KNOWN_BLOCKS else "other"


# Chosen by `type`, so an unknown type lands on OtherBlock rather than failing every variant.
Block = Annotated[Union[Annotated[TextBlock, Tag("text")], Annotated[ToolUseBlock, Tag("tool_use")],
                        Annotated[ToolResultBlock, Tag("tool_result")], Annotated[ThinkingBlock, Tag("thinking")],
                        Annotated[RedactedThinkingBlock, Tag("redacted_thinking")],
                        Annotated[OtherBlock, Tag("other")]], Discriminator(_block_kind)]


class AnthropicMessage(_Lenient):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


class AnthropicTool(_Lenient):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class AnthropicToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(_Lenient):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class MessagesRequest(_Lenient):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: Union[str, list[TextBlock], None] = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = None
    top_k: int | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None
    metadata: dict[str, Any] | None = None  # user_id for the caller's own tracking; nothing to act on


class CountTokensRequest(_Lenient):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Union[str, list[TextBlock], None] = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None


def _result_text(block: ToolResultBlock) -> str:
    if block.content is None or isinstance(block.content, str):
        text = block.content or ""
    else:
        parts = []
        for part in block.content:
            if part.get("type") != "text":
                raise APIError(400, f"tool_result content of type {part.get('type')!r} is not supported",
                               param="messages")
            parts.append(part.get("text", ""))
        text = "".join(parts)
    return f"Error: {text}" if block.is_error else text


def _refuse(block: OtherBlock) -> None:
    raise APIError(400, f"content block type {block.type!r} is not supported by this model (text only)",
                   param="messages")


def chat_messages(system: Union[str, list[TextBlock], None], messages: list[AnthropicMessage]) -> list[dict]:
    out: list[dict] = []
    if system:
        out.append({"role": "system",
                    "content": system if isinstance(system, str) else "".join(b.text for b in system)})
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        if m.role == "user":
            texts = []
            for b in m.content:
                if isinstance(b, ToolResultBlock):
                    out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _result_text(b)})
                elif isinstance(b, TextBlock):
                    texts.append(b.text)
                elif isinstance(b, OtherBlock):
                    _refuse(b)
                else:
                    raise APIError(400, f"a user message cannot hold a {b.type} block", param="messages")
            if texts:
                out.append({"role": "user", "content": "".join(texts)})
            continue
        msg: dict[str, Any] = {"role": "assistant", "content": ""}
        calls, thoughts = [], []
        for b in m.content:
            if isinstance(b, TextBlock):
                msg["content"] += b.text
            elif isinstance(b, ThinkingBlock):
                thoughts.append(b.thinking)
            elif isinstance(b, ToolUseBlock):
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
            elif isinstance(b, RedactedThinkingBlock):
                continue  # opaque by definition: there is no text to give the template
            elif isinstance(b, OtherBlock):
                _refuse(b)
            else:
                raise APIError(400, f"an assistant message cannot hold a {b.type} block", param="messages")
        if thoughts:
            msg["reasoning_content"] = "".join(thoughts)
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def chat_tools(tools: list[AnthropicTool] | None) -> list[dict] | None:
    if not tools:
        return None
    return [{"type": "function", "function": {k: v for k, v in (("name", t.name), ("description", t.description),
                                                                  ("parameters", t.input_schema)) if v is not None}}
            for t in tools]


def chat_tool_choice(choice: AnthropicToolChoice | None) -> Any:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, "tool_choice of type tool needs a name", param="tool_choice")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def template_kwargs(thinking: ThinkingConfig | None) -> dict[str, Any] | None:
    """GLM's template thinks by default; an explicit `thinking` turns it on or off."""
    if thinking is None:
        return None
    return {"enable_thinking": thinking.type != "disabled"}


def chat_request(body: MessagesRequest, stream: bool) -> dict:
    """The /v1/chat/completions body that asks for the same generation."""
    req: dict[str, Any] = {
        "model": body.model, "messages": chat_messages(body.system, body.messages), "max_tokens": body.max_tokens,
        "stream": stream, "tools": chat_tools(body.tools), "tool_choice": chat_tool_choice(body.tool_choice),
        "chat_template_kwargs": template_kwargs(body.thinking),
    }
    if body.thinking is not None and body.thinking.budget_tokens is not None \
            and not 0 < body.thinking.budget_tokens < body.max_tokens:
        raise APIError(400, "thinking.budget_tokens must be positive and less than max_tokens",
                       param="thinking.budget_tokens")
    for ours, value in (("temperature", body.temperature), ("top_p", body.top_p), ("top_k", body.top_k),
                        ("stop", body.stop_sequences)):
        if value is not None:
            req[ours] = value
    if body.tool_choice is not None and body.tool_choice.disable_parallel_tool_use:
        req["parallel_tool_calls"] = False
    if stream:  # prompt ids on the first chunk give message_start its input_tokens; usage comes last
        req["stream_options"] = {"include_usage": True}
        req["return_token_ids"] = True
    return {k: v for k, v in req.items() if v is not None}
