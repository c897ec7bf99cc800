"""The prefill worker sends whole blocks straight from its paged cache, so a request's blocks stay
allocated (and count as used in GetLoad) after the request finished, until the link has sent them; a
transfer that is delivered, cancelled, or whose decode peer disappears gives every block back.

The real PrefillService and engine (tiny model) on this process's event loop; D is a KVLinkServer here
or in a child process. A transfer stays in flight for as long as the test wants by sending to a link
the decode worker has not joined yet (P's link thread waits for it, holding everything queued)."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time

import pytest

from glmserve.engine.async_engine import AsyncEngine
from glmserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.engine import LLMEngine
from glmserve.engine.kv_link import LinkAddress
from glmserve.engine.kv_receiver import KVLinkServer, KVReceiver
from glmserve.engine.tiny_model import build_tiny_model
from glmserve.metrics import ServiceMetrics
from glmserve.prefill.service import PrefillService
from glmserve.protos import worker_pb2 as pb
from glmserve.worker.config import WorkerConfig
from glmserve.worker.lifecycle import Lifecycle, ServingState

BS = 4
PROMPT = list(range(3, 3 + 5 * BS + 2))  # 5 whole blocks (sent straight from the cache) and a tail


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("glm4_moe", tmp_path_factory.mktemp("delayed_free") / "m", seed=3)


@pytest.fixture
def prefill(model_dir):
    engine_cfg = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", show_progress=False,
                              cache=CacheConfig(block_size=BS, num_blocks=64),
                              scheduler=SchedulerConfig(max_num_batched_tokens=64, chunked_prefill_size=16))
    cfg = WorkerConfig(role="prefill", engine=engine_cfg, served_model_name="tiny", kv_timeout=3.0)
    async_engine = AsyncEngine(LLMEngine(engine_cfg))
    async_engine.start()
    lifecycle = Lifecycle()
    lifecycle.state = ServingState.SERVING
    service = PrefillService(cfg, async_engine, ServiceMetrics("prefill", "tiny"), lifecycle)
    yield service
    service.links.close()
    async_engine.stop()


def request(address: LinkAddress, transfer_id: int) -> pb.PrefillRequest:
    return pb.PrefillRequest(request_id=f"r{transfer_id}", token_ids=PROMPT, block_size=BS, transfer_id=transfer_id,
                             sampling=pb.SamplingOptions(temperature=0.0),
                             kv_link=pb.KvLinkAddress(host=address.host, port=address.port, link_id=address.name))


async def load(service: PrefillService) -> pb.LoadReport:
    return await service.GetLoad(pb.LoadRequest(), None)


async def until_prefilled(service: PrefillService, rid: str) -> pb.LoadReport:
    """The request is done in the engine (its token sampled) and its blocks are held for the send."""
    deadline = time.monotonic() + 20
    while not await service.async_engine.call(lambda e: rid not in e.requests and e.scheduler.holds.num_holds):
        assert time.monotonic() < deadline, "no blocks held after the prefill"
        await asyncio.sleep(0.01)
    return await load(service)


async def until_all_free(service: PrefillService, timeout: float = 10.0) -> pb.LoadReport:
    deadline = time.monotonic() + timeout
    while (rep := await load(service)).free_blocks != rep.total_blocks and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return rep


def expected_bytes(service: PrefillService) -> int:
    caches = service.engine.runner.kv_caches
    return sum(c[0].numel() // BS * c.element_size() for c in caches) * len(PROMPT)


def test_blocks_stay_used_until_the_transfer_is_sent_then_all_are_free(prefill):
    server = KVLinkServer("127.0.0.1", 0, timeout_s=10.0)

    async def run():
        address = LinkAddress(server.host, server.port, "joins-late")
        call = asyncio.create_task(prefill.Prefill(request(address, 1), None))
        rep = await until_prefilled(prefill, "r1")
        held = rep.total_blocks - rep.free_blocks
        assert held == -(-len(PROMPT) // BS) and rep.running_requests == 0  # counted as used
        await asyncio.sleep(0.3)
        assert (await load(prefill)).free_blocks == rep.free_blocks and not call.done()

        rx = KVReceiver(address, timeout_s=10.0)  # the decode worker joins: the sends go out
        d_caches = [c.clone().zero_() for c in prefill.engine.runner.kv_caches]
        handle = rx.expect(1, d_caches, list(range(held)), len(PROMPT), len(d_caches))
        resp = await asyncio.wait_for(call, 20)
        assert not resp.HasField("status") or resp.status.code == 0, resp.status.message
        assert resp.kv_bytes_sent == handle.wait(10) == expected_bytes(prefill) > 0
        assert rx.bytes_in_place > 0  # whole blocks went straight from cache to cache
        rep = await load(prefill)  # freed before the response: nothing left to wait for
        assert rep.free_blocks == rep.total_blocks
        rx.close()

    try:
        asyncio.run(run())
    finally:
        server.close()


def test_cancel_mid_transfer_frees_every_block(prefill):
    server = KVLinkServer("127.0.0.1", 0, timeout_s=10.0)

    async def run():
        address = LinkAddress(server.host, server.port, "never-joins")
        call = asyncio.create_task(prefill.Prefill(request(address, 2), None))
        rep = await until_prefilled(prefill, "r2")
        assert rep.free_blocks < rep.total_blocks
        call.cancel()  # the router gave up on the request
        with pytest.raises(asyncio.CancelledError):
            await call
        rep = await until_all_free(prefill)
        assert rep.free_blocks == rep.total_blocks

    try:
        asyncio.run(run())
    finally:
        server.close()


def _decode_worker(conn) -> None:
    server = KVLinkServer("127.0.0.1", 0)
    conn.send(server.port)
    conn.recv()  # killed while P waits for it


def test_decode_peer_that_dies_frees_every_block(prefill):
    """D dies before joining: the call fails (retriable, after kv_timeout) and every block is free."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    d = ctx.Process(target=_decode_worker, args=(child,), daemon=True)
    d.start()

    async def run():
        address = LinkAddress("127.0.0.1", conn.recv(), "dies")
        call = asyncio.create_task(prefill.Prefill(request(address, 3), None))
        rep = await until_prefilled(prefill, "r3")
        assert rep.free_blocks < rep.total_blocks
        os.kill(d.pid, signal.SIGKILL)
        resp = await asyncio.wait_for(call, 20)
        assert resp.status.code == pb.ERROR_CODE_KV_TRANSFER_FAILED and resp.status.retriable
        rep = await until_all_free(prefill)
        assert rep.free_blocks == rep.total_blocks

    try:
        asyncio.run(run())
    finally:
        d.kill()
