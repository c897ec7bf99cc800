"""The engine: a model, its paged KV cache, a scheduler and a sampler, advanced one step at a time.

It speaks token ids only. Text (tokenizing, detokenizing, stop strings) belongs to the callers: the
offline `LLM` and the router.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from glmserve.engine.attention import registry as attention_registry
from glmserve.engine.block_pool import BlockPool
from glmserve.engine.config import EngineConfig, ModelConfig
from glmserve.engine.dtypes import resolve_device
from glmserve.engine.loader import LoadedModel, load_model
from glmserve.engine.logits_processors import validate_token_constraints
from glmserve.engine.model_runner import ModelRunner
from glmserve.engine.outputs import EngineOutput
from glmserve.engine.parallel import parallel_state
from glmserve.engine.parallel.group_runner import LeaderRunner
from glmserve.engine.request import FinishReason, Request, RequestStatus
from glmserve.engine.sampler import SampledToken, Sampler, SamplingRow
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.scheduler import Scheduler
from glmserve.engine.structured_output.manager import StructuredOutputManager
from glmserve.engine.spec_decode.mtp_speculator import MTPSpeculator

if TYPE_CHECKING:
    from glmserve.engine.mm_inputs import MultiModalPrompt


class RequestError(ValueError):
    """A request the engine refuses (too long, bad token ids, duplicate id)."""


class EngineBusy(RequestError):
    """Refused for now (the queue is full): another worker, or a retry later, may take it."""


class LLMEngine:
    def __init__(self, cfg: EngineConfig, loaded: LoadedModel | None = None):
        self.cfg = cfg
        if loaded is None:
            device = resolve_device(cfg.device)
            backend = attention_registry.create_for_roles(cfg.prefill_attention_backend,
                                                        cfg.decode_attention_backend, device)
            loaded = load_model(cfg.model, dtype=cfg.dtype, device=str(device), load_format=cfg.load_format,
                                seed=cfg.seed, backend=backend, show_progress=cfg.show_progress, with_mtp=cfg.with_mtp)
        self.loaded = loaded
        self.model_config: ModelConfig = loaded.config
        self.device = torch.device(loaded.device)
        limit = cfg.scheduler.max_model_len or loaded.config.max_position_embeddings
        self.max_model_len = min(limit, loaded.config.max_position_embeddings)
        spec_k = cfg.speculative_num_steps if cfg.with_mtp else 0
        if cfg.with_mtp and getattr(loaded.model, "mtp", None) is None:
            raise ValueError(f"speculative decoding with MTP needs the checkpoint's MTP layer; {cfg.model} has no "
                             "MTP weights (num_nextn_predict_layers = 0 or no mtp tensors)")
        self.runner = ModelRunner(loaded.model, loaded.config, loaded.model.backend, cfg.cache,
                                  loaded.dtype, self.device, enable_cuda_graph=cfg.enable_cuda_graph and not spec_k,
                                  cuda_graph_max_batch_size=min(cfg.cuda_graph_max_batch_size, cfg.scheduler.max_num_seqs),
                                  max_model_len=self.max_model_len,
                                  cuda_graph_capture_sizes=cfg.cuda_graph_capture_sizes,
                                  extra_kv_layers=1 if spec_k else 0, num_lookahead_tokens=spec_k)
        group = parallel_state.current()
        if group.is_parallel and group.rank == 0:  # the leader announces each step to the other ranks
            self.runner = LeaderRunner(self.runner, group)
        self.pool = BlockPool(self.runner.num_blocks, cfg.cache.block_size, cfg.cache.enable_prefix_caching)
        self.scheduler = Scheduler(cfg.scheduler, self.pool)
        self.scheduler.num_lookahead_tokens = spec_k
        # Speculative decoding (EngineConfig.speculative_algorithm == "mtp") runs its own step.
        self.speculator = MTPSpeculator(self, spec_k) if spec_k else None
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        # How many of `requests` sample with anything but plain greedy (SamplingRow.plain): while none
        # does, a step samples with one argmax without looking at each row.
        self._num_not_plain = 0
        self.default_eos = frozenset(loaded.config.eos_token_ids)
        # Grammars (structured outputs): compiled grammars and one matcher per constrained request.
        self.structured = StructuredOutputManager(loaded.model_dir, loaded.config.vocab_size,
                                                  sorted(self.default_eos))
        # Optional observer of each forward pass (the prefill worker streams KV out from it):
        # `before_forward(chunks) -> on_layer_done callable or None`, the model's per-layer hook.
        self.step_observer = None

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    eos_token_ids: frozenset[int] | None = None, remote_prefill: bool = False,
                    max_waiting_remote: int | None = None, mm: "MultiModalPrompt | None" = None) -> Request:
        """Queue a request. remote_prefill: a prefill worker computes the prompt's KV and first token
        (decode workers); the request waits for its blocks in the same queue, then for the KV
        (`remote_kv_arrived`). max_waiting_remote bounds how many such requests may queue for blocks.
        mm: the prompt's images (engine/mm_inputs.py build_mm_prompt), for a vision model only."""
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        if not prompt_token_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_token_ids)} tokens; this model's context is "
                               f"{self.max_model_len} tokens including the output")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        if mm is not None and self.model_config.vision is None:
            raise RequestError(f"this model ({self.model_config.arch}) takes no images")
        if remote_prefill and max_waiting_remote is not None and self.scheduler.num_waiting_remote >= max_waiting_remote:
            raise EngineBusy(f"queue is full: {max_waiting_remote} requests already wait for KV blocks")
        # Request migration: the prompt's last `resumed_output_tokens` tokens were generated by an earlier
        # attempt; they count as output (max/min_tokens, penalties) and a seeded RNG skips their draws.
        resumed = params.resumed_output_tokens
        req = Request(request_id, list(prompt_token_ids), params,
                      num_prompt_tokens=len(prompt_token_ids) - resumed,
                      eos_token_ids=self.default_eos if eos_token_ids is None else eos_token_ids,
                      max_model_len=self.max_model_len, remote_prefill=remote_prefill, mm=mm)
        self._add_constraints(req)
        req.seed_generator(self.device)
        req.replay_draws(resumed, self.model_config.vocab_size)
        req.sampling_row = self._sampling_row(req)
        self.requests[request_id] = req
        if not req.sampling_row.plain:
            self._num_not_plain += 1
        self.scheduler.add(req)
        return req

    def remote_kv_arrived(self, request_id: str, first_token: SampledToken, num_cached_tokens: int = 0,
                          mtp_hidden: torch.Tensor | None = None) -> Request:
        """The prompt's KV of a remote-prefill request is in its blocks and the prefill worker sampled
        its first token: it joins the running batch and decodes from token 2. mtp_hidden (MTP speculative
        decoding): the target's hidden state at the last prompt position, which the first drafts start from."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.WAITING_FOR_REMOTE_KVS:
            raise RequestError(f"request {request_id!r} is not waiting for remote KV (aborted?)")
        req.num_cached_tokens = num_cached_tokens
        # The prefill worker drew the first token from a generator of the same seed; replay that draw so
        # this one continues where it left off (same tokens as one process would give).
        req.replay_draws(1, self.model_config.vocab_size)
        self.scheduler.remote_kv_arrived(req)
        req.append_token(first_token)
        # The prefill worker sampled the first token under the same grammar: catch the matcher up.
        self.structured.replay(request_id, [first_token.token_id])
        req.check_stop()
        if req.is_finished:
            self.retire(req)
        elif self.speculator is not None and mtp_hidden is not None:
            self.speculator.draft_after_remote_prefill(req, mtp_hidden)
        return req

    def abort(self, request_id: str) -> bool:
        req = self._forget(request_id)
        self.structured.remove(request_id)
        if req is None:
            return False
        self.scheduler.finish(req, FinishReason.ABORT)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        if self.speculator is not None:
            return self.speculator.step()
        plan = self.scheduler.schedule()
        outputs = self.settle_plan(plan)
        if plan.is_empty():
            return outputs
        observer = self.step_observer
        on_layer_done = observer.before_forward(plan.chunks) if observer is not None else None
        # -- structured output: fill grammar bitmasks on a helper thread while the forward runs
        grammars = bool(self.structured.grammars)  # skip the per-request work when no request has one
        masks = (self.structured.begin_masks([c.request.request_id for c in plan.chunks if c.completes_sequence])
                 if grammars else None)
        # An observer with `after_sample` (the MTP prefill worker) also gets the hidden states.
        after_sample = getattr(observer, "after_sample", None)
        result = self.runner.execute(plan.chunks, on_layer_done, keep_hidden=after_sample is not None)
        if masks is not None:
            self.structured.apply(masks, result.logits, [c.request.request_id for c in result.sample_chunks])
        self.scheduler.advance_all(plan.chunks)
        if not self._num_not_plain and result.sample_chunks:  # every row plain greedy: not one looked at
            ids = Sampler.argmax_ids(result.logits)
            return self._emit_plain(result.sample_chunks, ids, outputs, grammars, after_sample, result.hidden)
        rows = [c.request.sampling_row for c in result.sample_chunks]
        plain_ids = Sampler.plain_greedy_ids(result.logits, rows) if rows else None
        if plain_ids is not None:
            return self._emit_plain(result.sample_chunks, plain_ids, outputs, grammars, after_sample, result.hidden)
        sampled = self.sampler(result.logits, rows) if rows else []
        if after_sample is not None:  # before any request finishes and frees its blocks
            after_sample(result.hidden, {c.request.request_id: t.token_id for c, t in zip(result.sample_chunks, sampled)})
        append = outputs.append
        for chunk, token in zip(result.sample_chunks, sampled):
            req = chunk.request
            req.append_token(token)
            if grammars:
                self.structured.accept(req.request_id, token.token_id)
            req.check_stop()
            new_logprobs = [token] if req.params.logprobs is not None else []
            if req.status is RequestStatus.FINISHED:
                self.retire(req)
                append(self._finished_output(req, [token.token_id], new_logprobs))
            else:
                cached = req.num_cached_tokens
                append(EngineOutput(req.request_id, [token.token_id], new_logprobs, False, None, None,
                                    req.num_prompt_tokens, cached if cached > 0 else 0))
        return outputs

    def _emit_plain(self, chunks, token_ids: list[int], outputs: list[EngineOutput], grammars: bool,
                    after_sample, hidden) -> list[EngineOutput]:
        """The rest of step() for a batch of plain greedy rows (no logprobs, penalties or constraints):
        the same per-request effects as the general loop, on bare token ids. This loop runs for every
        sequence every step, so the usual token skips check_stop through its precheck, inlined."""
        if after_sample is not None:  # before any request finishes and frees its blocks
            after_sample(hidden, {c.request.request_id: t for c, t in zip(chunks, token_ids)})
        append = outputs.append
        for chunk, token_id in zip(chunks, token_ids):
            req = chunk.request
            toks = req.token_ids
            toks.append(token_id)  # append_token: plain rows keep no logprobs
            if grammars:
                self.structured.accept(req.request_id, token_id)
            if len(toks) >= req.stop_check_len or token_id in req.stop_check_ids:
                req.check_stop()
                if req.status is RequestStatus.FINISHED:
                    self.retire(req)
                    append(self._finished_output(req, [token_id]))
                    continue
            cached = req.num_cached_tokens
            append(EngineOutput(req.request_id, [token_id], [], False, None, None, req.num_prompt_tokens,
                                cached if cached > 0 else 0))
        return outputs

    def retire(self, req: Request) -> None:
        """A request that just finished (stop, length) leaves the scheduler, `requests` and its grammar."""
        self.scheduler.finish(req)
        self._forget(req.request_id)
        self.structured.remove(req.request_id)

    def _forget(self, request_id: str) -> Request | None:
        """Drop a request from `requests` (it finished or was aborted); returns it, or None if unknown."""
        req = self.requests.pop(request_id, None)
        if req is not None and not req.sampling_row.plain:
            self._num_not_plain -= 1
        return req

    def settle_plan(self, plan) -> list[EngineOutput]:
        """Before a step's forward: finish the requests the scheduler rejected and drop the step-input
        rows of those it released. Returns the rejected requests' final outputs."""
        outputs = [self._finished_output(r, []) for r in plan.rejected]
        for r in plan.rejected:
            self._forget(r.request_id)
            self.structured.remove(r.request_id)
        self.runner.release_rows(plan.released)
        return outputs

    def _add_constraints(self, req: Request) -> None:
        """Refuse bad token ids or grammars up front; set up the request's grammar matcher."""
        try:
            validate_token_constraints(req.params, self.model_config.vocab_size)
            eos = frozenset() if req.params.ignore_eos else req.eos_token_ids
            self.structured.add(req.request_id, req.params.structured_output, eos or self.default_eos)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def _sampling_row(self, req: Request) -> SamplingRow:
        eos = frozenset() if req.params.ignore_eos else req.eos_token_ids
        return SamplingRow(req.params, req.token_ids, req.num_prompt_tokens, req.generator, eos)

    @staticmethod
    def _finished_output(req: Request, new_ids: list[int], new_logprobs=()) -> EngineOutput:
        return EngineOutput(req.request_id, new_ids, list(new_logprobs), finished=True,
                            finish_reason=req.finish_reason.value if req.finish_reason else None,
                            stop_reason=req.stop_reason, num_prompt_tokens=req.num_prompt_tokens,
                            num_cached_tokens=max(req.num_cached_tokens, 0))

    # -- introspection (metrics, load reports) -----------------------------------------------------
    def stats(self) -> dict[str, float]:
        pool = self.pool
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting) + len(self.scheduler.waiting_for_kv),
            "num_requests_waiting_for_remote_kv": len(self.scheduler.waiting_for_kv),
            "num_queued_tokens": self.scheduler.queued_prompt_tokens(),
            "kv_cache_usage_perc": pool.usage,
            "free_blocks": pool.num_free,
            "total_blocks": pool.num_blocks,
            "prefix_cache_queries": pool.prefix_queries,
            "prefix_cache_hits": pool.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
        }

    def run_until_done(self, deadline_s: float | None = None) -> list[EngineOutput]:
        """Step until idle (tests, offline use)."""
        start = time.monotonic()
        out: list[EngineOutput] = []
        while self.has_unfinished():
            out += self.step()
            if deadline_s is not None and time.monotonic() - start > deadline_s:
                raise TimeoutError("engine did not finish in time")
        return out
