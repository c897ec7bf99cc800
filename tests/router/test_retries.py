"""The router's retries, without a network: a retriable failure is tried again, on another decode worker
when there is one, else on the same one; a stream that fails after tokens were delivered resumes after
them on another worker (request migration), so the caller sees no gap and no duplicate."""

from __future__ import annotations

import asyncio

import pytest

from glmserve.engine.sampling_params import SamplingParams
from glmserve.metrics import ServiceMetrics
from glmserve.protos import worker_pb2 as pb
from glmserve.router.backend import BackendError, ModelInfo
from glmserve.router.discovery import StaticDiscovery
from glmserve.router.grpc_backend import DisaggregatedBackend
from glmserve.router.worker_pool import Worker, WorkerPool

NO_CAPACITY = [pb.TokenChunk(finish_reason=pb.FINISH_REASON_ERROR,
                             status=pb.Status(code=pb.ERROR_CODE_NO_KV_CAPACITY, message="full", retriable=True))]
ANSWER = [pb.TokenChunk(token_ids=[7, 8], prompt_tokens=3), pb.TokenChunk(token_ids=[9], finish_reason=pb.FINISH_REASON_LENGTH)]
BROKEN_AFTER_A_TOKEN = [pb.TokenChunk(token_ids=[7], prompt_tokens=3), None]  # None: the stream breaks


class _Call:
    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    async def read(self):
        import grpc

        if not self.chunks:
            return grpc.aio.EOF
        c = self.chunks.pop(0)
        if c is None:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
        return c

    async def __aiter__(self):
        import grpc

        for c in self.chunks:
            if c is None:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
            yield c


class _Decode:
    """Answers each Generate with the next scripted stream; records what it was asked."""

    def __init__(self, *streams):
        self.streams = list(streams)
        self.requests = []

    def Generate(self, request):
        self.requests.append(request)
        return _Call(self.streams.pop(0))


def _backend(**decode_stubs):
    pool = WorkerPool(StaticDiscovery(["p"], list(decode_stubs)), ServiceMetrics("router", "m"))
    pool.workers[("prefill", "p")] = Worker("p", "prefill", channel=None, stub=None, healthy=True)
    for address, stub in decode_stubs.items():
        pool.workers[("decode", address)] = Worker(address, "decode", channel=None, stub=stub, healthy=True,
                                                   load=pb.LoadReport(total_blocks=100, free_blocks=100))
    return DisaggregatedBackend(pool, ModelInfo(64, 100, frozenset()), worker_wait_timeout=0.5), pool


async def _collect(backend):
    return [d async for d in backend.generate("req", [1, 2, 3], SamplingParams(max_tokens=3))]


def test_a_refused_request_moves_to_the_other_decode_worker():
    a, b = _Decode(NO_CAPACITY), _Decode(ANSWER)
    backend, _ = _backend(a=a, b=b)
    deltas = asyncio.run(_collect(backend))
    assert [t for d in deltas for t in d.token_ids] == [7, 8, 9] and deltas[-1].finish_reason == "length"
    assert len(a.requests) == 1 and len(b.requests) == 1
    assert b.requests[0].request_id == "req.r1" and b.requests[0].prefill_address == "p"


def test_with_one_decode_worker_a_refused_request_is_retried_there():
    only = _Decode(NO_CAPACITY, NO_CAPACITY, ANSWER)
    backend, _ = _backend(only=only)
    deltas = asyncio.run(_collect(backend))
    assert [t for d in deltas for t in d.token_ids] == [7, 8, 9]
    assert [r.request_id for r in only.requests] == ["req", "req.r1", "req.r2"]


def test_retries_are_bounded():
    only = _Decode(NO_CAPACITY, NO_CAPACITY, NO_CAPACITY, ANSWER)
    backend, _ = _backend(only=only)
    with pytest.raises(BackendError, match="full") as info:
        asyncio.run(_collect(backend))
    assert info.value.retriable and info.value.status == 503 and len(only.requests) == 3


def test_a_stream_broken_after_delivering_tokens_resumes_on_another_worker():
    resumed = [pb.TokenChunk(token_ids=[8], prompt_tokens=4), pb.TokenChunk(token_ids=[9], finish_reason=pb.FINISH_REASON_LENGTH)]
    a, b = _Decode(BROKEN_AFTER_A_TOKEN), _Decode(resumed)
    backend, pool = _backend(a=a, b=b)
    deltas = asyncio.run(_collect_seeded(backend))
    assert [t for d in deltas for t in d.token_ids] == [7, 8, 9] and deltas[-1].finish_reason == "length"
    # The continuation's prompt is the original plus the streamed token, which it counts as output.
    (again,) = b.requests
    assert list(again.prompt_token_ids) == [1, 2, 3, 7] and again.sampling.resumed_output_tokens == 1
    assert again.sampling.max_tokens == 3 and again.sampling.seed == 11  # unchanged: the worker counts
    assert [d.num_prompt_tokens for d in deltas] == [3, 0, 0]  # usage reports the client's prompt
    assert [w.address for w in pool.healthy("decode")] == ["b"]


def test_a_request_whose_streams_keep_breaking_fails_after_bounded_attempts():
    a = _Decode(BROKEN_AFTER_A_TOKEN, [None], [None])
    backend, _ = _backend(a=a)
    backend.pool.refresh = _heal(backend.pool)  # the worker "comes back" each time
    got = []

    async def run():
        async for d in backend.generate("req", [1, 2, 3], SamplingParams(max_tokens=5)):
            got.extend(d.token_ids)

    with pytest.raises(BackendError, match="after 3 attempts.*UNAVAILABLE"):
        asyncio.run(run())
    assert got == [7] and len(a.requests) == 3


def test_a_stream_that_used_up_max_tokens_before_breaking_finishes_without_another_attempt():
    a, b = _Decode([pb.TokenChunk(token_ids=[7, 8, 9], prompt_tokens=3), None]), _Decode(ANSWER)
    backend, _ = _backend(a=a, b=b)
    deltas = asyncio.run(_collect(backend))
    assert [t for d in deltas for t in d.token_ids] == [7, 8, 9] and deltas[-1].finish_reason == "length"
    assert not b.requests


def test_a_frozen_worker_that_leaves_the_pool_has_its_request_moved():
    import grpc

    class _Frozen(_Call):
        async def read(self):
            if self.chunks:
                return self.chunks.pop(0)
            await asyncio.sleep(3600)  # SIGSTOP: the stream stays open and silent
            return grpc.aio.EOF

    class _FrozenDecode(_Decode):
        def Generate(self, request):
            self.requests.append(request)
            return _Frozen(self.streams.pop(0))

    a, b = _FrozenDecode([pb.TokenChunk(token_ids=[7], prompt_tokens=3)]), _Decode([pb.TokenChunk(token_ids=[8, 9], finish_reason=pb.FINISH_REASON_LENGTH)])
    backend, pool = _backend(a=a, b=b)

    async def run():
        out = []
        async for d in backend.generate("req", [1, 2, 3], SamplingParams(max_tokens=3)):
            out.extend(d.token_ids)
            if out == [7]:
                pool.workers[("decode", "a")].healthy = False  # what missed load polls do
        return out

    assert asyncio.run(asyncio.wait_for(run(), 10)) == [7, 8, 9]
    assert list(b.requests[0].prompt_token_ids) == [1, 2, 3, 7]


async def _collect_seeded(backend):
    return [d async for d in backend.generate("req", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.7, seed=11))]


def _heal(pool):
    async def refresh():
        for w in pool.workers.values():
            w.healthy = True
    return refresh


def test_without_a_healthy_decode_worker_the_request_fails_after_the_wait():
    backend, pool = _backend(a=_Decode(ANSWER))
    pool.workers[("decode", "a")].healthy = False
    pool.refresh = _no_poll  # the worker stays down
    with pytest.raises(BackendError, match="no healthy decode worker") as info:
        asyncio.run(_collect(backend))
    assert info.value.status == 503


async def _no_poll():
    return None


def test_a_request_with_bad_words_is_not_resumed_mid_stream():
    """Its matcher would not know the streamed tokens: retried only before the first token."""
    a, b = _Decode(BROKEN_AFTER_A_TOKEN), _Decode(ANSWER)
    backend, _ = _backend(a=a, b=b)

    async def run():
        async for _ in backend.generate("req", [1, 2, 3], SamplingParams(max_tokens=3, bad_words_token_ids=[[5]])):
            pass

    with pytest.raises(BackendError, match="cannot resume mid-stream"):
        asyncio.run(run())
    assert not b.requests
