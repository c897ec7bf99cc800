"""The router's GenerationBackend over an engine running in the same process."""

from __future__ import annotations

from glmserve.engine.async_engine import AsyncEngine
from glmserve.engine.engine import RequestError
from glmserve.router.backend import BackendError, GenerationBackend, ModelInfo, TokenDelta


class InProcessBackend(GenerationBackend):
    """One engine in the router's process (single-process serving, and the baseline in benchmarks)."""

    def __init__(self, async_engine: AsyncEngine):
        self.async_engine = async_engine
        eng = async_engine.engine
        self._info = ModelInfo(eng.max_model_len, eng.model_config.vocab_size, eng.default_eos)

    def model_info(self) -> ModelInfo:
        return self._info

    async def start(self) -> None:
        self.async_engine.start()

    async def stop(self) -> None:
        self.async_engine.stop()

    def healthy(self) -> bool:
        return self.async_engine.dead is None

    def capacity_tokens(self) -> int | None:
        pool = self.async_engine.engine.pool
        return pool.num_blocks * pool.block_size

    async def generate(self, request_id, prompt_token_ids, params, eos_token_ids=None, mm=None):
        try:
            async for out in self.async_engine.generate(request_id, prompt_token_ids, params, eos_token_ids, mm=mm):
                yield TokenDelta(out.new_token_ids, out.new_logprobs, out.finished, out.finish_reason,
                                 out.stop_reason, out.num_prompt_tokens, out.num_cached_tokens)
        except RequestError as exc:
            raise BackendError(str(exc), status=400) from exc
