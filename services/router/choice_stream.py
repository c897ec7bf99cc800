"""Token ids of one choice in, API-level deltas out: detokenize, stop strings, reasoning, tool calls.

The workers only ever see token ids; everything textual happens here, once per choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from glmserve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from glmserve.engine.sampled_token import SampledToken
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.tokenizer import Tokenizer
from glmserve.router.backend import TokenDelta


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ChoiceDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampledToken] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # A stop string matched: the caller must cancel the request on the workers.
    stopped_by_string: bool = False

    def is_empty(self) -> bool:
        return not (self.content or self.reasoning or self.tool_calls or self.token_ids or self.finish_reason)


class ChoiceStream:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 reasoning_parser=None, tool_parser=None, text_prefix: str = ""):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens,
                                            params.spaces_between_special_tokens)
        self.stops = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        self.reasoning_parser = reasoning_parser
        self.tool_parser = tool_parser
        self.token_ids: list[int] = []
        self.text = ""
        self.saw_tool_call = False
        # Text forced into the prompt (e.g. "<tool_call>name" for a named tool_choice) that the parsers
        # must see as if the model had written it.
        self._prefix = text_prefix
        self.finished = False

    def push(self, delta: TokenDelta) -> ChoiceDelta:
        out = ChoiceDelta(token_ids=list(delta.token_ids), logprobs=list(delta.logprobs))
        self.token_ids += delta.token_ids
        text = self.detok.push(delta.token_ids)
        if delta.finished:
            text += self.detok.flush()  # bytes of an unfinished character, if any
        if self._prefix:
            text, self._prefix = self._prefix + text, ""
        final = delta.finished
        if self.stops is not None:
            text, stopped, matched = self.stops.feed(text)
            if stopped:
                out.stopped_by_string = True
                out.finish_reason, out.stop_reason = "stop", matched
                final = True
            elif final:
                text += self.stops.flush()
        self.text += text
        self._route(text, out, final)
        if final and not out.stopped_by_string:
            out.finish_reason, out.stop_reason = delta.finish_reason, delta.stop_reason
        if final:
            self.finished = True
            if self.saw_tool_call and out.finish_reason == "stop":
                out.finish_reason = "tool_calls"
        return out

    def _route(self, text: str, out: ChoiceDelta, final: bool) -> None:
        content = text
        if self.reasoning_parser is not None:
            reasoning, content = self.reasoning_parser.feed(text) if text else ("", "")
            if final:
                r2, c2 = self.reasoning_parser.finish()
                reasoning, content = (reasoning or "") + (r2 or ""), (content or "") + (c2 or "")
            out.reasoning += reasoning or ""
            content = content or ""
        if self.tool_parser is None:
            out.content += content
            return
        events = self.tool_parser.feed(content) if content else []
        if final:
            events += self.tool_parser.finish()
        for ev in events:
            if ev.kind == "content":
                out.content += ev.text
            else:
                self.saw_tool_call = True
                out.tool_calls.append(ToolCallDelta(ev.index, ev.id, ev.name, ev.arguments or ""))
