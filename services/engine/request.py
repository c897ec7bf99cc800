"""A request owns its token ids, its block table and its sampling state.

One token list holds the prompt and the output (`token_ids`, the first `num_prompt_tokens` are the
prompt): a step appends to it, nothing rebuilds it. Block hashes grow with it, one new hash per newly
filled block.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from glmserve.engine.sampler import SampledToken, SamplingRow
from glmserve.engine.sampling_params import SamplingParams
from glmserve.prefix_hash import extend_chain

if TYPE_CHECKING:
    from glmserve.engine.mm_inputs import MultiModalPrompt
    from glmserve.engine.scheduler import ScheduledChunk


_NO_IDS: frozenset[int] = frozenset()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    # Decode worker: blocks allocated, the prompt's KV is on its way from a prefill worker (vLLM's name).
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, stop token or stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    token_ids: list[int]  # prompt, then every generated token
    params: SamplingParams
    num_prompt_tokens: int = -1  # -1: all of token_ids at creation
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    # The prompt's KV comes from a prefill worker instead of being computed here.
    remote_prefill: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    output_logprobs: list[SampledToken] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_registered_blocks: int = 0  # leading blocks already published to the prefix cache
    num_cached_tokens: int = -1  # prefix-cache hit of the first scheduling; -1 until scheduled
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    generator: torch.Generator | None = None
    # The sampler's view of the request, built once (its token list is token_ids itself, so it follows).
    sampling_row: SamplingRow | None = None
    _block_hashes: list[int] = field(default_factory=list)
    # The prompt's images and M-RoPE positions (multimodal models only).
    mm: MultiModalPrompt | None = None
    # check_stop's precheck, set once from the settings: a new token can finish the request only if it
    # is one of `stop_check_ids` or the sequence reaches `stop_check_len` tokens.
    stop_check_ids: frozenset[int] = field(init=False)
    stop_check_len: int = field(init=False)
    # The scheduler's one-token chunk of this request, made when it is queued and reused every decode step
    # (scheduler.py); it points back here, so the scheduler drops it when the request gives its blocks back.
    decode_chunk: ScheduledChunk | None = None

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)
        p = self.params
        eos = _NO_IDS if p.ignore_eos else frozenset(self.eos_token_ids)  # the caller's set itself, no copy
        self.stop_check_ids = eos.union(p.stop_token_ids) if p.stop_token_ids else eos
        self.stop_check_len = self.max_model_len
        if p.max_tokens is not None:
            self.stop_check_len = min(self.max_model_len, self.num_prompt_tokens + p.max_tokens)

    def seed_generator(self, device: torch.device) -> None:
        """A seeded request samples from its own RNG, on the device the logits live on."""
        if self.params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.params.seed)

    def replay_draws(self, n: int, vocab_size: int) -> None:
        """Advance a seeded generator past n draws made elsewhere (by the prefill worker, or by an earlier
        attempt before a request migration), so this request samples what one undisturbed process would."""
        if self.generator is not None and not self.params.greedy:
            for _ in range(n):
                torch.rand(vocab_size, generator=self.generator, device=self.generator.device)

    # Slices copy: for callers off the per-step path (outputs, tests).
    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def block_hashes(self, block_size: int) -> list[int]:
        """Chained hashes of every full block of the request's tokens; only new blocks are hashed."""
        if len(self._block_hashes) < len(self.token_ids) // block_size:
            if self.mm is not None:  # image content is part of the key (engine/mm_inputs.py)
                from glmserve.engine.mm_inputs import extend_chain_mm

                extend_chain_mm(self._block_hashes, self.token_ids, block_size, self.mm)
            else:
                extend_chain(self._block_hashes, self.token_ids, block_size)
        return self._block_hashes

    def append_token(self, sampled: SampledToken) -> None:
        self.token_ids.append(sampled.token_id)
        if self.params.logprobs is not None:
            self.output_logprobs.append(sampled)

    def check_stop(self) -> None:
        """Finish on eos / stop token / max_tokens / context length, after a token was appended."""
        n_tokens = len(self.token_ids)  # runs per request per step: no property calls
        last = self.token_ids[-1]
        if n_tokens < self.stop_check_len and last not in self.stop_check_ids:
            return  # the usual token: nothing below can fire
        p = self.params
        n_out = n_tokens - self.num_prompt_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and last in self.eos_token_ids:
                self.finish(FinishReason.STOP)
                return
            if p.stop_token_ids and last in p.stop_token_ids:
                self.finish(FinishReason.STOP, stop_reason=last)
                return
        if (p.max_tokens is not None and n_out >= p.max_tokens) or n_tokens >= self.max_model_len:
            self.finish(FinishReason.LENGTH)

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
