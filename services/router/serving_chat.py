"""POST /v1/chat/completions."""

from __future__ import annotations

import json
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from glmserve.engine.structured_output.spec import GrammarSpec
from glmserve.router.choice_stream import ChoiceDelta, ChoiceStream
from glmserve.router.constraint_params import apply_constraints
from glmserve.router.field_audit import refuse_unsupported_fields
from glmserve.router.errors import APIError
from glmserve.router.protocol import ChatCompletionRequest, NamedToolChoice
from glmserve.router.request_params import build_sampling_params, max_tokens_for, per_choice_params
from glmserve.router.serving_common import (ChoiceRun, RequestTiming, chat_logprobs, collect_until_disconnect,
                                            new_id, sse, stream_with_timeout)
from glmserve.router.state import RouterState
from glmserve.router.structured_request import make_spec, requested_grammar
from glmserve.router.tool_grammar import tool_call_structural_tag
from glmserve.router.vision_inputs import VisionInputs


def _messages(body: ChatCompletionRequest, vision: VisionInputs | None = None) -> tuple[list[dict], list[str]]:
    """Messages with text content, and the image URLs in order (image parts become the model's image
    placeholder when the model takes images)."""
    raw = [m.model_dump(exclude_none=True) for m in body.messages]
    urls: list[str] = []
    if vision is not None:
        raw, urls = vision.split(raw)
    out = []
    for d in raw:
        if isinstance(d.get("content"), list):
            texts = []
            for part in d["content"]:
                if part.get("type") == "text":
                    texts.append(part.get("text", ""))
                else:
                    raise APIError(400, f"content part type {part.get('type')!r} is not supported by this model",
                                   param="messages")
            d["content"] = "".join(texts)
        out.append(d)
    return out, urls


def _forces_tool_call(body: ChatCompletionRequest, tool_parser: str | None) -> bool:
    """tool_choice required / named: the reply must be tool calls (a grammar makes sure, tool_grammar.py)."""
    if isinstance(body.tool_choice, NamedToolChoice):
        names = {t.function.name for t in body.tools or []}
        if body.tool_choice.function.name not in names:
            raise APIError(400, f"tool_choice names {body.tool_choice.function.name!r}, which is not in tools",
                           param="tool_choice")
    elif body.tool_choice == "required":
        if not body.tools:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
    else:
        return False
    if tool_parser is None:
        raise APIError(400, "tool_choice 'required' or a named function needs the server started with "
                            "--tool-call-parser", param="tool_choice")
    return True


def _grammar(body: ChatCompletionRequest, tools: list[dict] | None, tool_parser: str | None,
             end_think_id: int | None) -> tuple[GrammarSpec | None, bool]:
    """The request's grammar (from response_format / structured_outputs / guided_*, or its tool calls),
    and whether it is the tool-call grammar."""
    asked = requested_grammar(body)
    tool_tag = None
    if tools and tool_parser is not None and body.tool_choice != "none":
        choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice) else body.tool_choice
        tool_tag = tool_call_structural_tag(tools, choice, body.parallel_tool_calls, tool_parser)
    if asked and tool_tag:
        raise APIError(400, f"{asked[2]} cannot be combined with tool_choice 'required', a named function or "
                            "strict tools", param=asked[2])
    if tool_tag:
        return make_spec("structural_tag", json.dumps(tool_tag), "tools", end_think_id), True
    return (make_spec(*asked, end_think_id) if asked else None), False


class ChatHandler:
    def __init__(self, state: RouterState):
        self.state = state

    async def handle(self, body: ChatCompletionRequest, raw: Request):
        st = self.state
        st.check_model(body.model)
        refuse_unsupported_fields(body)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        kwargs = dict(body.chat_template_kwargs or {})
        thinking = bool(kwargs.get("enable_thinking", True))
        forced = _forces_tool_call(body, st.config.tool_call_parser)
        messages, image_urls = _messages(body, st.vision)
        try:
            prompt = st.tokenizer.apply_chat_template(messages, tools=tools,
                                                      add_generation_prompt=body.add_generation_prompt, **kwargs)
        except APIError:
            raise
        except Exception as exc:  # template errors are the caller's input problem
            raise APIError(400, f"could not render the chat template: {exc}", param="messages") from exc
        if forced:
            prompt = st.close_open_think(prompt)
            thinking = False
        # The output starts inside a thinking block only when the rendered prompt left one open.
        think_open = prompt.rstrip().endswith("<think>")
        # With a reasoning parser the grammar waits for the end of an open thinking block (as vLLM).
        reasoning_first = think_open and st.reasoning_parser_cls is not None
        grammar, tool_grammar = _grammar(body, tools, st.config.tool_call_parser,
                                         st.tokenizer.token_to_id("</think>") if reasoning_first else None)
        prompt_ids = st.tokenizer.encode(prompt)
        mm = None
        if image_urls:  # fetched, decoded and patched here; the placeholders widen to each image's tokens
            prompt_ids, mm = await st.vision.prepare(prompt_ids, image_urls)
        info = st.backend.model_info()
        max_tokens = max_tokens_for(body.max_completion_tokens or body.max_tokens, len(prompt_ids), info)
        n_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        params = apply_constraints(build_sampling_params(body, max_tokens, n_logprobs, st.defaults), body,
                                   st.tokenizer, grammar)
        if grammar is not None:
            st.metrics.get("structured_output_requests", kind=grammar.kind).inc()
        use_tools = bool(body.tools) and body.tool_choice != "none" and st.tool_parser_cls is not None

        def make_stream(_: int) -> ChoiceStream:
            reasoning = (st.reasoning_parser_cls(thinking_enabled=thinking, starts_in_think=think_open)
                         if st.reasoning_parser_cls else None)
            tool = st.tool_parser_cls(tools, grammar_padding=tool_grammar) if use_tools else None
            return ChoiceStream(st.tokenizer, prompt_ids, params, reasoning, tool)

        request_id = new_id("chatcmpl")
        timing = RequestTiming(st.metrics)
        st.metrics.get("prompt_tokens").inc(len(prompt_ids))
        run = ChoiceRun(st.backend, request_id, prompt_ids, make_stream, per_choice_params(params), timing, mm=mm)
        created = int(time.time())
        if body.stream:
            events = self._stream(run, body, request_id, created)
            return StreamingResponse(stream_with_timeout(events, st.config.request_timeout, st.metrics),
                                     media_type="text/event-stream")
        deltas = await collect_until_disconnect(run, raw, st.config.request_timeout)
        return JSONResponse(self._response(run, body, deltas, request_id, created))

    # -- non-streaming --------------------------------------------------------------------------
    def _response(self, run: ChoiceRun, body, deltas, request_id: str, created: int) -> dict:
        st = self.state
        choices = []
        for index in range(len(run.params)):
            mine = [d for i, d in deltas if i == index]
            message: dict = {"role": "assistant", "content": "".join(d.content for d in mine)}
            reasoning = "".join(d.reasoning for d in mine)
            if st.reasoning_parser_cls is not None:
                message["reasoning_content"] = reasoning or None
            calls = _merge_tool_calls(mine)
            if calls:
                message["tool_calls"] = calls
                if not message["content"]:
                    message["content"] = None
            last = mine[-1] if mine else ChoiceDelta()
            choice = {"index": index, "message": message, "finish_reason": last.finish_reason,
                      "stop_reason": last.stop_reason,
                      "logprobs": (chat_logprobs(st.tokenizer, [lp for d in mine for lp in d.logprobs])
                                   if body.logprobs else None)}
            if body.return_token_ids:
                choice["token_ids"] = [t for d in mine for t in d.token_ids]
            choices.append(choice)
        resp = {"id": request_id, "object": "chat.completion", "created": created, "model": st.config.served_model_name,
                "choices": choices, "usage": run.usage()}
        if body.return_token_ids:
            resp["prompt_token_ids"] = run.prompt_token_ids
        return resp

    # -- streaming ------------------------------------------------------------------------------
    async def _stream(self, run: ChoiceRun, body, request_id: str, created: int) -> AsyncIterator[str]:
        st = self.state
        base = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": st.config.served_model_name}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        for index in range(len(run.params)):
            first = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            chunk = {**base, "choices": [first]}
            if body.return_token_ids:
                chunk["prompt_token_ids"] = run.prompt_token_ids
            yield sse(chunk)
        tool_names_sent: set[tuple[int, int]] = set()
        async for index, d in run.deltas():
            delta: dict = {}
            if d.reasoning:
                delta["reasoning_content"] = d.reasoning
            if d.content:
                delta["content"] = d.content
            if d.tool_calls:
                delta["tool_calls"] = [_tool_call_chunk(index, c, tool_names_sent) for c in d.tool_calls]
            if not delta and d.finish_reason is None and not (body.return_token_ids and d.token_ids):
                continue
            choice = {"index": index, "delta": delta, "finish_reason": d.finish_reason,
                      "logprobs": chat_logprobs(st.tokenizer, d.logprobs) if body.logprobs and d.logprobs else None}
            if d.finish_reason is not None:
                choice["stop_reason"] = d.stop_reason
            if body.return_token_ids:
                choice["token_ids"] = d.token_ids
            yield sse({**base, "choices": [choice]})
        if include_usage:
            yield sse({**base, "choices": [], "usage": run.usage()})
        yield sse("[DONE]")


def _tool_call_chunk(choice_index: int, c, sent: set) -> dict:
    out: dict = {"index": c.index}
    if (choice_index, c.index) not in sent and c.name is not None:
        sent.add((choice_index, c.index))
        out.update({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
    else:
        out["function"] = {"arguments": c.arguments}
    return out


def _merge_tool_calls(deltas: list[ChoiceDelta]) -> list[dict]:
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.tool_calls:
            call = calls.setdefault(c.index, {"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
            if c.id:
                call["id"] = c.id
            if c.name:
                call["function"]["name"] = c.name
            call["function"]["arguments"] += c.arguments
    return [calls[i] for i in sorted(calls)]
