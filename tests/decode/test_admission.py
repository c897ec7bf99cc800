"""Decode admission: a request waits in a bounded FIFO queue for KV blocks, and is refused with a clear,
retriable error when the queue is full or the wait times out; the engine's pool is never overcommitted."""

import asyncio

import pytest

from glmserve.decode.service import BlockAdmission, RequestFailed
from glmserve.engine.block_pool import BlockPool
from glmserve.protos import worker_pb2 as pb


class FakeEngine:
    """Just the engine surface admission uses: reserve_blocks / abort on a real BlockPool."""

    def __init__(self, num_blocks: int):
        self.pool = BlockPool(num_blocks, block_size=4)
        self.reserved: dict[str, list[int]] = {}

    def reserve_blocks(self, request_id: str, num_tokens: int):
        n = -(-num_tokens // 4)
        if n > self.pool.num_free:
            return None
        self.reserved[request_id] = self.pool.allocate(n)
        return self.reserved[request_id]

    def abort(self, request_id: str) -> None:
        self.pool.free(self.reserved.pop(request_id))


class FakeAsyncEngine:
    def __init__(self, engine):
        self.engine = engine

    async def call(self, fn):
        return fn(self.engine)


def test_waits_for_blocks_then_gets_them():
    engine = FakeEngine(num_blocks=4)
    admission = BlockAdmission(FakeAsyncEngine(engine), max_waiting=4, timeout=5)

    async def run():
        first = await admission.acquire("a", 14)  # 15 tokens with the first output: all 4 blocks
        waiter = asyncio.create_task(admission.acquire("b", 3))
        await asyncio.sleep(0.1)
        assert not waiter.done() and admission.waiting == 1
        engine.abort("a")  # a finished: its blocks come back
        second = await asyncio.wait_for(waiter, 2)
        return first, second

    first, second = asyncio.run(run())
    assert len(first) == 4 and len(second) == 1 and engine.pool.num_free == 3


def test_refused_with_retriable_error_when_the_wait_times_out():
    engine = FakeEngine(num_blocks=2)
    admission = BlockAdmission(FakeAsyncEngine(engine), max_waiting=4, timeout=0.3)
    with pytest.raises(RequestFailed) as info:
        asyncio.run(admission.acquire("big", 100))
    assert info.value.code == pb.ERROR_CODE_NO_KV_CAPACITY and info.value.retriable
    assert "no KV capacity" in info.value.message and admission.waiting == 0
    chunk = info.value.chunk("big")
    assert chunk.finish_reason == pb.FINISH_REASON_ERROR and chunk.status.retriable


def test_refused_at_once_when_the_queue_is_full():
    engine = FakeEngine(num_blocks=1)
    admission = BlockAdmission(FakeAsyncEngine(engine), max_waiting=1, timeout=5)

    async def run():
        await admission.acquire("a", 2)
        blocked = asyncio.create_task(admission.acquire("b", 2))
        await asyncio.sleep(0.05)
        with pytest.raises(RequestFailed, match="queue is full"):
            await admission.acquire("c", 2)
        blocked.cancel()
        await asyncio.gather(blocked, return_exceptions=True)
        return admission.waiting

    assert asyncio.run(run()) == 0
