"""LightLLM's native endpoints: POST /generate and POST /generate_stream, in LightLLM's own shapes.

Body `{"inputs": str, "parameters": {...}}`. /generate replies `{"generated_text": [str],
"count_output_tokens", "finish_reason", "prompt_tokens"}` (scalars for one sequence, lists for n > 1);
/generate_stream sends `data: {"token": {...}, "generated_text": null, "finished": bool, "finish_reason",
"details": null}` per token.
"""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from glmserve.engine.sampling_params import SamplingParams
from glmserve.router.choice_stream import ChoiceStream
from glmserve.router.errors import APIError
from glmserve.router.protocol import GenerateRequest
from glmserve.router.request_params import max_tokens_for, per_choice_params
from glmserve.router.serving_common import (ChoiceRun, RequestTiming, collect_until_disconnect, new_id, sse,
                                            stream_with_timeout, token_text)
from glmserve.router.state import RouterState


def _params(body: GenerateRequest, prompt_len: int, st: RouterState) -> SamplingParams:
    p = body.parameters
    max_tokens = max_tokens_for(p.max_new_tokens, prompt_len, st.backend.model_info())
    try:
        return SamplingParams(
            n=p.n, temperature=p.temperature if p.do_sample else 0.0, top_p=p.top_p, top_k=max(p.top_k, 0),
            min_p=p.min_p, repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, max_tokens=max_tokens, min_tokens=p.min_new_tokens,
            stop=p.stop_sequences, ignore_eos=p.ignore_eos, seed=p.seed, skip_special_tokens=p.skip_special_tokens,
            logprobs=0 if p.return_details else None,
        )
    except ValueError as exc:
        raise APIError(400, str(exc), param="parameters") from exc


class GenerateHandler:
    def __init__(self, state: RouterState):
        self.state = state

    def _run(self, body: GenerateRequest) -> ChoiceRun:
        st = self.state
        ids = st.tokenizer.encode(body.inputs)
        if not ids:
            raise APIError(400, "inputs must not be empty", param="inputs")
        params = _params(body, len(ids), st)
        st.metrics.get("prompt_tokens").inc(len(ids))
        return ChoiceRun(st.backend, new_id("gen"), ids, lambda _: ChoiceStream(st.tokenizer, ids, params),
                         per_choice_params(params), RequestTiming(st.metrics))

    async def generate(self, body: GenerateRequest, raw: Request):
        """LightLLM's reply: generated_text is always a list; count_output_tokens, finish_reason (and tokens)
        are scalars for one sequence and lists for n > 1."""
        run = self._run(body)
        deltas = await collect_until_disconnect(run, raw, self.state.config.request_timeout)
        texts, reasons, counts, details = [], [], [], []
        for index in range(len(run.params)):
            mine = [d for i, d in deltas if i == index]
            texts.append("".join(d.content for d in mine))
            reasons.append(mine[-1].finish_reason if mine else None)
            counts.append(sum(len(d.token_ids) for d in mine))
            details.append([{"id": lp.token_id, "text": token_text(self.state.tokenizer, lp.token_id),
                             "logprob": lp.logprob, "special": self.state.tokenizer.is_special(lp.token_id)}
                            for d in mine for lp in d.logprobs])
        one = (lambda values: values[0]) if len(texts) == 1 else (lambda values: values)
        out = {"generated_text": texts, "count_output_tokens": one(counts), "finish_reason": one(reasons),
               "prompt_tokens": len(run.prompt_token_ids)}
        if body.parameters.return_details:
            out["tokens"] = one(details)
        return JSONResponse(out)

    async def generate_stream(self, body: GenerateRequest, raw: Request):
        run = self._run(body)
        if len(run.params) != 1:
            raise APIError(400, "generate_stream supports n=1", param="parameters.n")
        return StreamingResponse(stream_with_timeout(self._events(run), self.state.config.request_timeout,
                                                     self.state.metrics), media_type="text/event-stream")

    async def _events(self, run: ChoiceRun) -> AsyncIterator[str]:
        """One event per token, as LightLLM sends them: the token (with running counts), finished and
        finish_reason; generated_text and details stay null."""
        st = self.state
        count = 0
        async for _, d in run.deltas():
            ids = d.token_ids or [None]
            for j, tid in enumerate(ids):
                count += tid is not None
                last = d.finish_reason is not None and j == len(ids) - 1
                token = {"id": tid, "text": d.content if j == 0 else "",
                         "logprob": d.logprobs[j].logprob if j < len(d.logprobs) else None,
                         "special": tid is not None and st.tokenizer.is_special(tid),
                         "count_output_tokens": count, "prompt_tokens": len(run.prompt_token_ids)}
                yield sse({"token": token, "generated_text": None, "finished": last,
                           "finish_reason": d.finish_reason if last else None, "details": None})
