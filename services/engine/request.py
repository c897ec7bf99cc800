"""A request owns its token ids, its block table and its sampling state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from glmserve.engine.block_pool import chain_hashes
from glmserve.engine.sampler import SampledToken
from glmserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, stop token or stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[SampledToken] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit of the first scheduling; -1 until scheduled
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    generator: torch.Generator | None = None
    _block_hashes: list[int] = field(default_factory=list)

    def seed_generator(self, device: torch.device) -> None:
        """A seeded request samples from its own RNG, on the device the logits live on."""
        if self.params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.params.seed)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def block_hashes(self, block_size: int) -> list[int]:
        """Chained hashes of every full block of the request's tokens (grown incrementally)."""
        if len(self._block_hashes) < self.num_tokens // block_size:
            self._block_hashes = chain_hashes(self.all_token_ids, block_size, self._block_hashes)
        return self._block_hashes

    def append_token(self, sampled: SampledToken) -> None:
        self.output_token_ids.append(sampled.token_id)
        if self.params.logprobs is not None:
            self.output_logprobs.append(sampled)

    def check_stop(self) -> None:
        """Finish on eos / stop token / max_tokens / context length, after a token was appended."""
        p = self.params
        n_out = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if n_out >= p.min_tokens:
            if not p.ignore_eos and last in self.eos_token_ids:
                self.finish(FinishReason.STOP)
                return
            if p.stop_token_ids and last in p.stop_token_ids:
                self.finish(FinishReason.STOP, stop_reason=last)
                return
        if (p.max_tokens is not None and n_out >= p.max_tokens) or self.num_tokens >= self.max_model_len:
            self.finish(FinishReason.LENGTH)

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
