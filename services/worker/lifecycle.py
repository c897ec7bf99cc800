"""Serving state shared by a worker's gRPC and HTTP sides, and graceful draining on SIGTERM."""

from __future__ import annotations

import asyncio
import enum
import signal
import time


class ServingState(enum.Enum):
    NOT_READY = "not_ready"
    SERVING = "serving"
    DRAINING = "draining"


class Lifecycle:
    def __init__(self) -> None:
        self.state = ServingState.NOT_READY
        self.inflight = 0
        self.stopped = asyncio.Event()

    @property
    def accepting(self) -> bool:
        return self.state is ServingState.SERVING

    def begin(self) -> None:
        self.inflight += 1

    def end(self) -> None:
        self.inflight -= 1

    async def drain(self, timeout: float) -> None:
        """Refuse new work, wait for running requests (bounded by timeout), then stop."""
        self.state = ServingState.DRAINING
        deadline = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.stopped.set()

    def install_signal_handlers(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain(timeout)))
