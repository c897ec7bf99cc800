"""When requests are sent: Poisson arrivals at a given rate (or all at once), under an optional cap on
requests in flight, with a progress bar. Knows nothing about HTTP: it calls `send` for each request."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Awaitable, Callable, Sequence, TypeVar

import numpy as np
from tqdm import tqdm

Req = TypeVar("Req")
Out = TypeVar("Out")


def arrival_intervals(n: int, request_rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request. A Poisson process has exponential gaps with mean 1/rate;
    an infinite rate sends everything at once."""
    if request_rate <= 0:
        raise ValueError(f"--request-rate must be positive, got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return rng.exponential(1.0 / request_rate, size=n).tolist()


async def drive(requests: Sequence[Req], send: Callable[[Req], Awaitable[Out]], request_rate: float = math.inf,
                max_concurrency: int | None = None, seed: int = 0,
                disable_tqdm: bool = False) -> tuple[list[Out], float]:
    """Send every request; returns outputs in request order and the wall time from first send to last reply.

    Arrivals follow the schedule even when the concurrency cap is reached: late requests queue on the
    semaphore, as a real client pool would, so the cap limits requests in flight, not the offered load."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="requests")

    async def one(req: Req) -> Out:
        if limit is None:
            out = await send(req)
        else:
            async with limit:
                out = await send(req)
        bar.update(1)
        return out

    start = time.perf_counter()
    tasks = []
    try:
        for req, wait in zip(requests, arrival_intervals(len(requests), request_rate, seed)):
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(req)))
        outputs = list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()  # no-op for finished tasks; stops stragglers on Ctrl-C
        bar.close()
    return outputs, time.perf_counter() - start
