"""The decode worker's side of the KV connector: between the scheduler (engine thread), which owns a
request's blocks, and the gRPC handler (event loop), which runs its transfer.

The scheduler reports a remote-prefill request's blocks once allocated (`blocks_allocated`, delivered
on the request's stream) and, before it frees them for any reason, calls `request_freed`, which
cancels the transfer into them, or, when the handler has not registered it yet, makes sure it never
will. Either way no KV lands in a block after the pool has taken it back.
"""

from __future__ import annotations

import threading
from typing import Callable

from glmserve.engine.async_engine import KVAllocated
from glmserve.engine.kv_link import KVTransferCancelled
from glmserve.engine.kv_transport import KVTransferHandle
from glmserve.engine.request import Request


class DecodeKVConnector:
    def __init__(self, deliver: Callable[[str, object], None]):
        self._deliver = deliver
        self._lock = threading.Lock()
        self._transfers: dict[str, KVTransferHandle | None] = {}  # None: allocated, transfer not started

    # -- engine thread (scheduler side) --------------------------------------------------------
    def blocks_allocated(self, req: Request) -> None:
        with self._lock:
            self._transfers[req.request_id] = None
        self._deliver(req.request_id, KVAllocated(req.request_id, list(req.block_ids), req.num_computed_tokens))

    def request_freed(self, req: Request) -> None:
        with self._lock:  # held across the cancel: a start_transfer racing with us waits, then fails
            handle = self._transfers.pop(req.request_id, None)
            if handle is not None:
                handle.cancel()  # returns once no scatter into these blocks is in progress

    # -- event loop (worker side) --------------------------------------------------------------
    def start_transfer(self, request_id: str, expect: Callable[[], KVTransferHandle]) -> KVTransferHandle:
        """Register the transfer into the request's blocks, unless they were freed meanwhile."""
        with self._lock:
            if request_id not in self._transfers:
                raise KVTransferCancelled(f"request {request_id} was aborted before its KV transfer started")
            handle = self._transfers[request_id] = expect()
            return handle

    def transfer_done(self, request_id: str) -> None:
        """The KV has landed (or the handler gave up): nothing to cancel any more."""
        with self._lock:
            self._transfers.pop(request_id, None)

    @property
    def num_active(self) -> int:
        return len(self._transfers)
