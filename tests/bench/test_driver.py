"""Arrival schedule and the concurrency cap, with a fake `send` (no HTTP)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from glmserve.bench.driver import arrival_intervals, drive


def test_poisson_intervals_have_mean_one_over_rate():
    gaps = np.array(arrival_intervals(20000, request_rate=4.0, seed=0))
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)  # exponential: std equals mean, unlike fixed gaps
    assert gaps.min() >= 0


def test_intervals_seeded_and_inf_is_all_at_once():
    assert arrival_intervals(5, 2.0, seed=1) == arrival_intervals(5, 2.0, seed=1)
    assert arrival_intervals(5, 2.0, seed=1) != arrival_intervals(5, 2.0, seed=2)
    assert arrival_intervals(4, math.inf, seed=0) == [0.0] * 4
    with pytest.raises(ValueError):
        arrival_intervals(3, 0.0, seed=0)


class _Tracker:
    def __init__(self):
        self.in_flight = 0
        self.peak = 0

    async def send(self, req):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        return req * 10


@pytest.mark.parametrize("cap, expected_peak", [(1, 1), (3, 3), (None, 20)])
def test_concurrency_cap_respected(cap, expected_peak):
    t = _Tracker()
    outputs, duration = asyncio.run(drive(list(range(20)), t.send, max_concurrency=cap, disable_tqdm=True))
    assert t.peak == expected_peak
    assert outputs == [i * 10 for i in range(20)]  # request order kept
    assert duration >= 0.01 * math.ceil(20 / expected_peak) * 0.9


def test_poisson_pacing_spreads_requests():
    async def instant(req):
        return req

    rate, n, seed = 200.0, 30, 5
    _, duration = asyncio.run(drive(list(range(n)), instant, request_rate=rate, seed=seed, disable_tqdm=True))
    assert duration >= sum(arrival_intervals(n, rate, seed))  # sleeps really happen between sends


def test_bad_concurrency_rejected():
    async def instant(req):
        return req

    with pytest.raises(ValueError):
        asyncio.run(drive([1], instant, max_concurrency=0, disable_tqdm=True))
