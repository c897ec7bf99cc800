"""A worker that starts listening after the router first dialled it joins within about a second.

gRPC's default reconnect backoff grows towards two minutes; the router's channels cap it at one second,
so a worker still loading its model when the router came up is not left out of the pool.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from glmserve.local_ports import free_port
from glmserve.protos import worker_pb2 as pb
from glmserve.protos import worker_pb2_grpc as pb_grpc
from glmserve.worker.grpc_options import insecure_channel

# Long enough for gRPC's default backoff to have grown to several seconds: with the defaults the worker
# below was reached 1.7-4.8 s after it came up, with ours 0.5-0.8 s (dev machine, 2 cores).
DOWN_FOR_S = 12.0


class _Serving(pb_grpc.DecodeWorkerServicer):
    async def Health(self, request, context):
        return pb.HealthResponse(state=pb.SERVING_STATE_SERVING)


async def _health(stub) -> bool:
    try:
        await stub.Health(pb.HealthRequest(), timeout=0.5)
        return True
    except grpc.aio.AioRpcError:
        return False


@pytest.mark.asyncio
async def test_worker_that_comes_up_late_is_reached_within_seconds():
    address = f"127.0.0.1:{free_port()}"
    channel = insecure_channel(address)
    stub = pb_grpc.DecodeWorkerStub(channel)
    down_until = time.monotonic() + DOWN_FOR_S
    while time.monotonic() < down_until:  # polled like the router polls a worker still loading
        assert not await _health(stub)
        await asyncio.sleep(0.2)
    server = grpc.aio.server()
    pb_grpc.add_DecodeWorkerServicer_to_server(_Serving(), server)
    server.add_insecure_port(address)
    await server.start()
    try:
        up_at = time.monotonic()
        while not await _health(stub):
            assert time.monotonic() - up_at < 2.5, "the channel is still backing off a worker that is up"
            await asyncio.sleep(0.1)
    finally:
        await channel.close()
        await server.stop(None)
