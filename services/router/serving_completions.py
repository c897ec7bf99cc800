"""POST /v1/completions (text or token-id prompts, one or many)."""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from glmserve.router.choice_stream import ChoiceStream
from glmserve.router.errors import APIError
from glmserve.router.protocol import CompletionRequest
from glmserve.router.constraint_params import apply_constraints
from glmserve.router.field_audit import refuse_unsupported_fields
from glmserve.router.structured_request import make_spec, requested_grammar
from glmserve.router.request_params import build_sampling_params, max_tokens_for, per_choice_params
from glmserve.router.serving_common import (ChoiceRun, RequestTiming, collect_until_disconnect,
                                            completion_logprobs, new_id, sse, stream_with_timeout)
from glmserve.router.state import RouterState


def _prompts(body: CompletionRequest, tokenizer) -> list[tuple[str | None, list[int]]]:
    p = body.prompt
    if isinstance(p, str):
        return [(p, tokenizer.encode(p))]
    if not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [(None, list(p))]
    if all(isinstance(x, str) for x in p):
        return [(x, tokenizer.encode(x)) for x in p]
    if all(isinstance(x, list) for x in p):
        return [(None, list(x)) for x in p]
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of those",
                   param="prompt")


class CompletionHandler:
    def __init__(self, state: RouterState):
        self.state = state

    async def handle(self, body: CompletionRequest, raw: Request):
        st = self.state
        st.check_model(body.model)
        refuse_unsupported_fields(body)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        info = st.backend.model_info()
        prompts = _prompts(body, st.tokenizer)
        asked = requested_grammar(body)
        grammar = make_spec(*asked, None) if asked else None
        if grammar is not None:
            st.metrics.get("structured_output_requests", kind=grammar.kind).inc()
        runs = []
        request_id = new_id("cmpl")
        for k, (text, ids) in enumerate(prompts):
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            bad = [t for t in ids if not 0 <= t < info.vocab_size]
            if bad:
                raise APIError(400, f"prompt token ids out of range [0, {info.vocab_size}): {bad[:5]}", param="prompt")
            max_tokens = max_tokens_for(body.max_tokens, len(ids), info)
            params = apply_constraints(build_sampling_params(body, max_tokens, body.logprobs, st.defaults), body,
                                       st.tokenizer, grammar)

            def make_stream(_: int, ids=ids, params=params) -> ChoiceStream:
                return ChoiceStream(st.tokenizer, ids, params)

            st.metrics.get("prompt_tokens").inc(len(ids))
            runs.append((text, ChoiceRun(st.backend, f"{request_id}-{k}", ids, make_stream, per_choice_params(params),
                                         RequestTiming(st.metrics))))
        created = int(time.time())
        if body.stream:
            if len(runs) > 1:
                raise APIError(400, "streaming supports one prompt per request", param="prompt")
            events = self._stream(runs[0], body, request_id, created)
            return StreamingResponse(stream_with_timeout(events, st.config.request_timeout, st.metrics),
                                     media_type="text/event-stream")
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                              "prompt_tokens_details": {"cached_tokens": 0}}
        prompt_token_ids = []
        for k, (text, run) in enumerate(runs):
            deltas = await collect_until_disconnect(run, raw, st.config.request_timeout)
            for index in range(len(run.params)):
                mine = [d for i, d in deltas if i == index]
                out_text = "".join(d.content for d in mine)
                echo = (text if text is not None else st.tokenizer.decode(run.prompt_token_ids)) if body.echo else ""
                choice = {"index": k * len(run.params) + index, "text": echo + out_text,
                          "finish_reason": mine[-1].finish_reason if mine else None,
                          "stop_reason": mine[-1].stop_reason if mine else None,
                          "logprobs": (completion_logprobs(st.tokenizer, [lp for d in mine for lp in d.logprobs],
                                                           len(echo)) if body.logprobs is not None else None)}
                if body.return_token_ids:
                    choice["token_ids"] = [t for d in mine for t in d.token_ids]
                    choice["prompt_token_ids"] = run.prompt_token_ids
                choices.append(choice)
            u = run.usage()
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                usage[key] += u[key]
            usage["prompt_tokens_details"]["cached_tokens"] += u["prompt_tokens_details"]["cached_tokens"]
            prompt_token_ids.append(run.prompt_token_ids)
        resp = {"id": request_id, "object": "text_completion", "created": created,
                "model": st.config.served_model_name, "choices": choices, "usage": usage}
        if body.return_token_ids:
            resp["prompt_token_ids"] = prompt_token_ids[0] if len(prompt_token_ids) == 1 else prompt_token_ids
        return JSONResponse(resp)

    async def _stream(self, prompt_run, body: CompletionRequest, request_id: str, created: int) -> AsyncIterator[str]:
        st = self.state
        text, run = prompt_run
        base = {"id": request_id, "object": "text_completion", "created": created,
                "model": st.config.served_model_name}
        if body.echo:
            echo = text if text is not None else st.tokenizer.decode(run.prompt_token_ids)
            for index in range(len(run.params)):
                yield sse({**base, "choices": [{"index": index, "text": echo, "logprobs": None,
                                                "finish_reason": None}]})
        offsets = [0] * len(run.params)
        prompt_ids_sent: set[int] = set()
        async for index, d in run.deltas():
            if not d.content and d.finish_reason is None and not (body.return_token_ids and d.token_ids):
                continue
            choice = {"index": index, "text": d.content, "finish_reason": d.finish_reason,
                      "logprobs": (completion_logprobs(st.tokenizer, d.logprobs, offsets[index])
                                   if body.logprobs is not None and d.logprobs else None)}
            offsets[index] += len(d.content)
            if d.finish_reason is not None:
                choice["stop_reason"] = d.stop_reason
            if body.return_token_ids:
                choice["token_ids"] = d.token_ids
                if index not in prompt_ids_sent:
                    prompt_ids_sent.add(index)
                    choice["prompt_token_ids"] = run.prompt_token_ids
            yield sse({**base, "choices": [choice]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": run.usage()})
        yield sse("[DONE]")
