"""What the engine reports per step, and the vLLM-style results of the offline API."""

from __future__ import annotations

from dataclasses import dataclass, field

from glmserve.engine.sampled_token import SampledToken


@dataclass(slots=True)
class EngineOutput:
    """New tokens of one request from one engine step (one per running request per step: slots make it
    cheaper to build and keep it compact)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[SampledToken] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    # One dict per generated token: token id -> Logprob (the sampled token and the top-N).
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
