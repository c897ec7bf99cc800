"""Where the router's requests are computed: the disaggregated workers (grpc_backend), or an engine in the
same process (glmserve.single_process).

Both give the same async stream of token deltas, so the HTTP layer does not know which it talks to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import AsyncIterator

from glmserve.engine.sampled_token import SampledToken
from glmserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class ModelInfo:
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]


@dataclass
class TokenDelta:
    token_ids: list[int]
    logprobs: list[SampledToken] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class BackendError(RuntimeError):
    """A request failed on the workers. `retriable` errors map to HTTP 503, the others to 500/400."""

    def __init__(self, message: str, retriable: bool = False, status: int | None = None):
        super().__init__(message)
        self.retriable = retriable
        self.status = status or (503 if retriable else 500)


class GenerationBackend(ABC):
    @abstractmethod
    def model_info(self) -> ModelInfo: ...

    @abstractmethod
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: frozenset[int] | None = None, mm=None) -> AsyncIterator[TokenDelta]:
        """Stream a request's tokens. Closing the stream early cancels the request everywhere.
        mm: the prompt's images (engine.mm_inputs.MultiModalPrompt), for a vision model."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def healthy(self) -> bool:
        return True

    def capacity_tokens(self) -> int | None:
        """Tokens of KV cache the deployment holds in all (None: unknown)."""
        return None
