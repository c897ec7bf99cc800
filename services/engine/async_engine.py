"""An engine driven by a background thread, for asyncio servers (router in-process mode, workers).

The engine is not thread-safe, so every mutation happens on the engine thread: callers enqueue
commands (add / abort / run-in-thread) and receive outputs on per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from glmserve.engine.engine import LLMEngine, RequestError
from glmserve.engine.outputs import EngineOutput
from glmserve.engine.sampler import SampledToken
from glmserve.engine.sampling_params import SamplingParams


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] | None
    remote_prefill: bool = False
    max_waiting_remote: int | None = None
    mm: object = None  # MultiModalPrompt of a vision model's request


@dataclass
class _RemoteKVArrived:
    request_id: str
    first_token: SampledToken
    num_cached_tokens: int
    mtp_hidden: object = None  # torch.Tensor: MTP speculative decoding's first drafts start from it


@dataclass
class KVAllocated:
    """First item of a remote-prefill stream: the request holds its blocks; the first
    num_local_cached_tokens tokens are already in them (this worker's prefix cache)."""

    request_id: str
    block_ids: list[int]
    num_local_cached_tokens: int


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], object]
    done: "asyncio.Future"
    loop: asyncio.AbstractEventLoop


class _FreeHeldBlocks:
    """Blocks held for a KV send are free to go back to the pool (see block_holds.py)."""


class EngineError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.step_hooks: list[Callable[[LLMEngine, list[EngineOutput]], None]] = []
        self.dead: BaseException | None = None
        engine.scheduler.holds.on_done = lambda: self._commands.put(_FreeHeldBlocks())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._commands.put(None)
        self._thread.join(timeout=10)

    # -- API for asyncio callers ---------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       eos_token_ids: frozenset[int] | None = None, mm=None) -> AsyncIterator[EngineOutput]:
        """Stream outputs; leaving the iterator early (cancel, break, aclose) aborts the request."""
        if self.dead is not None:
            raise EngineError(f"engine stopped: {self.dead!r}")
        await self.prepare(params)
        command = _Add(request_id, prompt_token_ids, params, eos_token_ids, mm=mm)
        async for out in self._stream(request_id, command):
            yield out

    async def generate_remote(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                              eos_token_ids: frozenset[int] | None = None, max_waiting: int | None = None,
                              mm=None) -> AsyncIterator[KVAllocated | EngineOutput]:
        """A request whose prompt KV a prefill worker computes. Yields KVAllocated once its blocks are
        held; the caller then has the KV sent and calls remote_kv_arrived, after which the outputs
        follow (the first repeats the prefill worker's token). Leaving early aborts, at any stage."""
        if self.dead is not None:
            raise EngineError(f"engine stopped: {self.dead!r}")
        await self.prepare(params)
        command = _Add(request_id, prompt_token_ids, params, eos_token_ids, True, max_waiting, mm=mm)
        async for item in self._stream(request_id, command):
            yield item

    def remote_kv_arrived(self, request_id: str, first_token: SampledToken, num_cached_tokens: int,
                          mtp_hidden=None) -> None:
        self._commands.put(_RemoteKVArrived(request_id, first_token, num_cached_tokens, mtp_hidden))

    async def prepare(self, params: SamplingParams) -> None:
        """Compile the request's grammar on a helper thread (never on the event loop nor the engine
        thread, which keeps stepping); the engine then finds it in its cache. Raises RequestError."""
        spec = params.structured_output
        if spec is None:
            return
        try:
            await asyncio.to_thread(self.engine.structured.compile, spec)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    async def _stream(self, request_id: str, command) -> AsyncIterator[EngineOutput]:
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._commands.put(command)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if getattr(item, "finished", False):
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(_Abort(request_id))

    async def call(self, fn: Callable[[LLMEngine], object]):
        """Run fn(engine) on the engine thread (stats, direct cache access) and await its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._commands.put(_Call(fn, fut, loop))
        return await fut

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # -- engine thread -------------------------------------------------------------------------
    def deliver(self, request_id: str, item) -> None:
        """Hand an item to the request's stream (thread-safe; a no-op once the stream is gone)."""
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _handle(self, cmd) -> None:
        if isinstance(cmd, _Add):
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, cmd.eos_token_ids,
                                        remote_prefill=cmd.remote_prefill, max_waiting_remote=cmd.max_waiting_remote,
                                        mm=cmd.mm)
            except Exception as exc:  # refused: tell only that request
                self.deliver(cmd.request_id, exc)
        elif isinstance(cmd, _RemoteKVArrived):
            try:
                req = self.engine.remote_kv_arrived(cmd.request_id, cmd.first_token, cmd.num_cached_tokens,
                                                    cmd.mtp_hidden)
                self.deliver(cmd.request_id, EngineOutput(
                    # The token that just arrived is the last one (a migrated request's prompt ends with
                    # earlier output, so it is not at num_prompt_tokens).
                    cmd.request_id, req.token_ids[-1:], req.output_logprobs[-1:],
                    finished=req.is_finished, finish_reason=req.finish_reason.value if req.finish_reason else None,
                    stop_reason=req.stop_reason, num_prompt_tokens=req.num_prompt_tokens,
                    num_cached_tokens=max(req.num_cached_tokens, 0)))
            except Exception as exc:
                self.deliver(cmd.request_id, exc)
        elif isinstance(cmd, _Abort):
            if self.engine.abort(cmd.request_id):  # a stream still listening learns it ended
                self.deliver(cmd.request_id, EngineOutput(cmd.request_id, [], finished=True, finish_reason="abort"))
        elif isinstance(cmd, _FreeHeldBlocks):
            self.engine.scheduler.holds.free_done()
        elif isinstance(cmd, _Call):
            try:
                result = cmd.fn(self.engine)
                cmd.loop.call_soon_threadsafe(_resolve, cmd.done, result, None)
            except Exception as exc:
                cmd.loop.call_soon_threadsafe(_resolve, cmd.done, None, exc)

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                block = not self.engine.has_unfinished()
                try:
                    cmd = self._commands.get(block=block, timeout=0.1 if block else None)
                    while cmd is not None:
                        self._handle(cmd)
                        cmd = self._commands.get_nowait()
                except queue.Empty:
                    pass
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
                    for hook in self.step_hooks:
                        hook(self.engine, outputs)
                    for out in outputs:
                        self.deliver(out.request_id, out)
        except BaseException as exc:  # a dead engine must not leave clients hanging
            self.dead = exc
            for request_id in list(self._streams):
                self.deliver(request_id, EngineError(f"engine failed: {exc!r}"))
            raise


def _resolve(fut: asyncio.Future, result, exc) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
