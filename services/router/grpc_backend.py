"""Disaggregated generation: the router streams from a decode worker, which pulls the prompt's KV from
a prefill worker the router picked. A retriable failure tries again, on another decode worker when
there is one; one after tokens were streamed resumes after them (router/migration.py). A request waits
a while for a healthy worker before it fails."""

from __future__ import annotations

import asyncio
import logging

import grpc

from glmserve.protos import worker_pb2 as pb
from glmserve.router.backend import BackendError, GenerationBackend, ModelInfo, TokenDelta
from glmserve.router.migration import WorkerStalled, can_resume, next_chunk, nothing_left, resumed_params
from glmserve.router.worker_pool import WorkerPool
from glmserve.worker.convert import FINISH_FROM_PB, params_to_pb, sampled_from_pb
from glmserve.worker.images_pb import images_to_pb

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.1  # times the attempt number


class DisaggregatedBackend(GenerationBackend):
    def __init__(self, pool: WorkerPool, info: ModelInfo, worker_wait_timeout: float = 10.0):
        self.pool = pool
        self.info = info
        self.worker_wait_timeout = worker_wait_timeout

    def model_info(self) -> ModelInfo:
        return self.info

    async def start(self) -> None:
        await self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()

    def healthy(self) -> bool:
        return bool(self.pool.healthy("prefill")) and bool(self.pool.healthy("decode"))

    def capacity_tokens(self) -> int | None:
        loads = [w.load for w in self.pool.healthy("decode") if w.load and w.load.total_blocks]
        return sum(x.total_blocks * x.block_size for x in loads) or None

    def describe(self) -> dict:
        return self.pool.describe()

    async def generate(self, request_id, prompt_token_ids, params, eos_token_ids=None, mm=None):
        images = images_to_pb(mm)  # the router's patches, to the decode worker and on to the prefill worker
        want_logprobs = params.logprobs is not None
        tried: set[str] = set()
        streamed: list[int] = []  # tokens the caller already has; a later attempt resumes after them
        reason = "no attempt"
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                await asyncio.sleep(RETRY_BACKOFF_S * attempt)
            prompt = list(prompt_token_ids) + streamed
            if streamed and not can_resume(params):
                raise BackendError(f"{reason}; a request with a grammar or bad_words cannot resume mid-stream",
                                   retriable=True)
            if streamed and nothing_left(params, len(prompt_token_ids), streamed, self.info.max_model_len):
                yield TokenDelta([], finished=True, finish_reason="length")
                return
            sampling = params_to_pb(resumed_params(params, streamed) if streamed else params, eos_token_ids)
            # Another decode worker if there is one, else the same one again.
            hashes = self.pool.prompt_hashes(prompt)  # a resumed attempt's prompt holds the streamed tokens
            decode = await self.pool.wait_for(
                lambda: self.pool.pick_decode(exclude=tried, hashes=hashes) or self.pool.pick_decode(hashes=hashes),
                self.worker_wait_timeout)
            prefill = await self.pool.wait_for(lambda: self.pool.pick_prefill(prompt, hashes),
                                               self.worker_wait_timeout)
            if decode is None or prefill is None:
                raise BackendError("no healthy " + ("decode" if decode is None else "prefill") + " worker", retriable=True)
            tried.add(decode.address)
            req = pb.GenerateRequest(request_id=request_id if attempt == 0 else f"{request_id}.r{attempt}",
                                     prompt_token_ids=prompt, sampling=sampling, prefill_address=prefill.address,
                                     images=images)
            call = decode.stub.Generate(req)
            decode.inflight += 1
            prefill.inflight += 1
            delivered = False  # this attempt's prompt was prefilled (D streams)
            finished = False
            try:
                while True:
                    chunk = await next_chunk(call, lambda: decode.healthy)
                    if chunk is grpc.aio.EOF:
                        reason = f"decode worker {decode.address} ended the stream early"
                        break
                    if chunk.finish_reason == pb.FINISH_REASON_ERROR:
                        if not chunk.status.retriable:
                            status = 400 if chunk.status.code in (pb.ERROR_CODE_INVALID_REQUEST,
                                                                  pb.ERROR_CODE_PROMPT_TOO_LONG) else None
                            raise BackendError(chunk.status.message, retriable=False, status=status)
                        reason = chunk.status.message
                        if chunk.status.code in (pb.ERROR_CODE_PREFILL_FAILED, pb.ERROR_CODE_KV_TRANSFER_FAILED):
                            # Wait for a prefill worker that answers its polls (another, or this one restarted).
                            self.pool.mark_unhealthy(prefill, reason)
                        break
                    if not delivered:  # the prompt is prefilled once D streams: P's share of it is done
                        prefill.inflight = max(0, prefill.inflight - 1)
                        delivered = True
                    finished = chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                    streamed += chunk.token_ids
                    first = attempt == 0 and len(streamed) == len(chunk.token_ids)
                    yield TokenDelta(
                        token_ids=list(chunk.token_ids),
                        logprobs=[sampled_from_pb(t, lp, want_logprobs)
                                  for t, lp in zip(chunk.token_ids, chunk.logprobs)] if want_logprobs else [],
                        finished=finished, finish_reason=FINISH_FROM_PB.get(chunk.finish_reason),
                        stop_reason=chunk.stop_token_id if chunk.HasField("stop_token_id") else None,
                        # A resumed attempt's prompt holds earlier output: report the original's figures only.
                        num_prompt_tokens=chunk.prompt_tokens if first else 0,
                        num_cached_tokens=chunk.cached_prompt_tokens if first else 0)
                    if finished:
                        return
            except grpc.aio.AioRpcError as exc:
                reason = f"decode worker {decode.address} failed: {exc.code().name}"
                self.pool.mark_unhealthy(decode, f"stream failed: {exc.code().name}")
            except WorkerStalled:
                reason = f"decode worker {decode.address} stopped answering"
            finally:
                decode.inflight -= 1
                if not delivered:
                    prefill.inflight = max(0, prefill.inflight - 1)
                if not finished:
                    call.cancel()  # client gone, timeout, stop string or a failure: cancel on D (D cancels P)
            if attempt + 1 < MAX_ATTEMPTS:
                log.info("request %s: %s; %s", request_id, reason,
                         f"resuming after {len(streamed)} streamed tokens" if streamed else "retrying")
        raise BackendError(f"request failed after {MAX_ATTEMPTS} attempts: {reason}", retriable=True)
