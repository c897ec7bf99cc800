"""The decode worker's KV connector: a request freed by the scheduler at any moment stops its transfer
before the blocks are reused, or keeps one from ever starting."""

from __future__ import annotations

import threading
import time

import pytest

from glmserve.decode.kv_connector import DecodeKVConnector
from glmserve.engine.async_engine import KVAllocated
from glmserve.engine.kv_link import KVTransferCancelled
from glmserve.engine.request import Request
from glmserve.engine.sampling_params import SamplingParams


class Handle:
    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


def request(rid="r"):
    req = Request(rid, [1, 2, 3, 4, 5], SamplingParams())
    req.block_ids, req.num_computed_tokens = [7, 8], 4
    return req


def test_allocation_is_delivered_on_the_request_stream():
    delivered = []
    conn = DecodeKVConnector(lambda rid, item: delivered.append((rid, item)))
    conn.blocks_allocated(request())
    assert delivered == [("r", KVAllocated("r", [7, 8], 4))]


def test_freed_during_the_transfer_cancels_it():
    conn = DecodeKVConnector(lambda *a: None)
    req = request()
    conn.blocks_allocated(req)
    handle = conn.start_transfer("r", Handle)
    conn.request_freed(req)
    assert handle.cancelled and conn.num_active == 0


def test_freed_before_the_transfer_started_keeps_it_from_starting():
    conn = DecodeKVConnector(lambda *a: None)
    req = request()
    conn.blocks_allocated(req)
    conn.request_freed(req)
    started = []
    with pytest.raises(KVTransferCancelled):
        conn.start_transfer("r", lambda: started.append(1) or Handle())
    assert started == [] and conn.num_active == 0  # expect() never ran: nothing can land in the blocks


def test_a_free_racing_with_the_start_waits_for_it_then_cancels():
    conn = DecodeKVConnector(lambda *a: None)
    req = request()
    conn.blocks_allocated(req)
    handle = Handle()
    in_expect = threading.Event()

    def slow_expect():
        in_expect.set()
        time.sleep(0.2)
        return handle

    starter = threading.Thread(target=lambda: conn.start_transfer("r", slow_expect))
    starter.start()
    in_expect.wait(5)
    conn.request_freed(req)  # blocks until the start finished, then cancels what it registered
    starter.join(5)
    assert handle.cancelled and conn.num_active == 0


def test_done_transfers_are_forgotten():
    conn = DecodeKVConnector(lambda *a: None)
    req = request()
    conn.blocks_allocated(req)
    handle = conn.start_transfer("r", Handle)
    conn.transfer_done("r")
    conn.request_freed(req)
    assert not handle.cancelled and conn.num_active == 0
