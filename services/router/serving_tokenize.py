"""vLLM's POST /tokenize and POST /detokenize, and LightLLM's /get_model_name.

/tokenize takes either {"prompt": str, "add_special_tokens": true} or the chat form {"messages": [...],
"add_generation_prompt": true, "tools", "chat_template_kwargs"} (rendered exactly as /v1/chat/completions
renders it) and answers {"count", "max_model_len", "tokens", "token_strs"}; /detokenize takes
{"tokens": [ids]} and answers {"prompt": text}.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

from glmserve.router.errors import APIError
from glmserve.router.protocol import ChatMessage, ToolSpec
from glmserve.router.state import RouterState


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field here would change the answer silently


class TokenizeCompletionRequest(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    tools: list[ToolSpec] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


TokenizeRequest = Union[TokenizeCompletionRequest, TokenizeChatRequest]


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def tokenize(st: RouterState, body: TokenizeRequest) -> dict:
    st.check_model(body.model)
    if isinstance(body, TokenizeChatRequest):
        if body.continue_final_message:
            raise APIError(400, "continue_final_message is not supported", param="continue_final_message")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        for m in messages:  # the chat template would drop image parts: refuse rather than miscount
            if isinstance(m.get("content"), list) and any(
                    isinstance(part, dict) and part.get("type") not in (None, "text") for part in m["content"]):
                raise APIError(400, "/tokenize counts text parts only (image token counts: see the usage of a "
                                    "chat completion)", param="messages")
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        try:
            text = st.tokenizer.apply_chat_template(messages, tools=tools,
                                                    add_generation_prompt=body.add_generation_prompt,
                                                    **(body.chat_template_kwargs or {}))
        except Exception as exc:  # template errors are the caller's input problem
            raise APIError(400, f"could not render the chat template: {exc}", param="messages") from exc
    else:
        text = body.prompt
    ids = st.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
    strs = [st.tokenizer.id_to_token(i) for i in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": st.backend.model_info().max_model_len, "tokens": ids,
            "token_strs": strs}


def detokenize(st: RouterState, body: DetokenizeRequest) -> dict:
    st.check_model(body.model)
    vocab = st.tokenizer.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param="tokens")
    return {"prompt": st.tokenizer.decode(body.tokens, skip_special_tokens=False)}
