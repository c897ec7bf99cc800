"""Disaggregated generation: the router streams from a decode worker, which pulls the prompt's KV from
a prefill worker the router picked. Retriable failures before the first token try again, on another
decode worker when there is one; a request waits a while for a healthy worker before it fails."""

from __future__ import annotations

import asyncio
import logging

import grpc

from glmserve.protos import worker_pb2 as pb
from glmserve.router.backend import BackendError, GenerationBackend, ModelInfo, TokenDelta
from glmserve.router.worker_pool import WorkerPool
from glmserve.worker.convert import FINISH_FROM_PB, params_to_pb, sampled_from_pb

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

    def describe(self) -> dict:
        return self.pool.describe()

    async def generate(self, request_id, prompt_token_ids, params, eos_token_ids=None):
        sampling = params_to_pb(params, eos_token_ids)
        want_logprobs = params.logprobs is not None
        tried: set[str] = set()
        hashes = self.pool.prompt_hashes(prompt_token_ids)
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                await asyncio.sleep(RETRY_BACKOFF_S * attempt)
            # Another decode worker if there is one, else the same one again.
            decode = await self.pool.wait_for(
                lambda: self.pool.pick_decode(exclude=tried, hashes=hashes) or self.pool.pick_decode(hashes=hashes),
                self.worker_wait_timeout)
            prefill = await self.pool.wait_for(lambda: self.pool.pick_prefill(prompt_token_ids, hashes),
                                               self.worker_wait_timeout)
            if decode is None or prefill is None:
                raise BackendError("no healthy " + ("decode" if decode is None else "prefill") + " worker", retriable=True)
            tried.add(decode.address)
            req = pb.GenerateRequest(request_id=request_id if attempt == 0 else f"{request_id}.r{attempt}",
                                     prompt_token_ids=prompt_token_ids, sampling=sampling,
                                     prefill_address=prefill.address)
            call = decode.stub.Generate(req)
            decode.inflight += 1
            prefill.inflight += 1
            delivered = False
            finished = False
            try:
                async for chunk in call:
                    if chunk.finish_reason == pb.FINISH_REASON_ERROR:
                        if chunk.status.retriable and not delivered and attempt + 1 < MAX_ATTEMPTS:
                            log.warning("request %s: %s; retrying elsewhere", request_id, chunk.status.message)
                            break
                        status = 400 if chunk.status.code in (pb.ERROR_CODE_INVALID_REQUEST,
                                                              pb.ERROR_CODE_PROMPT_TOO_LONG) else None
                        raise BackendError(chunk.status.message, retriable=chunk.status.retriable, status=status)
                    if not delivered:  # the prompt is prefilled once D streams: P's share of it is done
                        prefill.inflight = max(0, prefill.inflight - 1)
                        delivered = True
                    finished = chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                    yield TokenDelta(
                        token_ids=list(chunk.token_ids),
                        logprobs=[sampled_from_pb(t, lp, want_logprobs)
                                  for t, lp in zip(chunk.token_ids, chunk.logprobs)] if want_logprobs else [],
                        finished=finished, finish_reason=FINISH_FROM_PB.get(chunk.finish_reason),
                        stop_reason=chunk.stop_token_id if chunk.HasField("stop_token_id") else None,
                        num_prompt_tokens=chunk.prompt_tokens, num_cached_tokens=chunk.cached_prompt_tokens)
                    if finished:
                        return
                else:
                    raise BackendError(f"decode worker {decode.address} ended the stream early", retriable=True)
            except grpc.aio.AioRpcError as exc:
                self.pool.mark_unhealthy(decode, f"stream failed: {exc.code().name}")
                if not delivered and attempt + 1 < MAX_ATTEMPTS:
                    log.warning("decode worker %s failed (%s); retrying elsewhere", decode.address, exc.code().name)
                    continue
                raise BackendError(f"decode worker {decode.address} failed: {exc.code().name}", retriable=True) from exc
            finally:
                decode.inflight -= 1
                if not delivered:
                    prefill.inflight = max(0, prefill.inflight - 1)
                if not finished:
                    call.cancel()  # client gone, timeout or stop string: cancel on D (and D cancels P)
        raise BackendError("all attempts failed", retriable=True)
