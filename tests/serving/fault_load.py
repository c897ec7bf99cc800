"""Steady streaming load against a running deployment, with faults injected into its worker processes.

Every request is one of a few fixed specs (greedy and seeded) whose undisturbed output is recorded first,
so each completed request can be checked token for token: a migrated stream must have no gap and no
duplicate. Used by the fault test (tests/serving/test_faults_e2e.py) and benchmarks/fault_table.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field

import httpx
import openai

MODEL = "model"


@dataclass(frozen=True)
class Spec:
    prompt: tuple[int, ...]
    temperature: float
    seed: int | None
    max_tokens: int


def default_specs(n: int = 8, max_tokens: int = 32) -> list[Spec]:
    return [Spec(tuple(range(3 + i, 40 + 3 * i)), 0.0 if i % 2 == 0 else 0.9, None if i % 2 == 0 else 100 + i,
                 max_tokens) for i in range(n)]


@dataclass
class Outcome:
    spec: int
    start: float
    end: float
    error: str | None
    tokens: list[int] = field(default_factory=list)


class Load:
    def __init__(self, base_url: str, specs: list[Spec], clients: int = 6, timeout: float = 120.0):
        self.base_url = base_url
        self.specs = specs
        self.clients = clients
        self.client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=timeout)
        self.expected: list[list[int]] = []
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()

    async def one(self, index: int) -> Outcome:
        s = self.specs[index]
        start = time.monotonic()
        tokens: list[int] = []
        try:
            extra = {"ignore_eos": True, "return_token_ids": True}
            stream = await self.client.completions.create(
                model=MODEL, prompt=list(s.prompt), max_tokens=s.max_tokens, temperature=s.temperature,
                seed=s.seed, stream=True, extra_body=extra)
            async for chunk in stream:
                for c in chunk.choices:
                    tokens += (c.model_extra or {}).get("token_ids") or []
            return Outcome(index, start, time.monotonic(), None, tokens)
        except openai.APIError as exc:
            return Outcome(index, start, time.monotonic(), f"{type(exc).__name__}: {exc}", tokens)

    async def record_reference(self) -> None:
        """Each spec's output on the undisturbed deployment."""
        self.expected = []
        for i in range(len(self.specs)):
            out = await self.one(i)
            assert out.error is None, out.error
            self.expected.append(out.tokens)

    async def _client(self, k: int) -> None:
        n = k
        while not self._stop.is_set():
            self.outcomes.append(await self.one(n % len(self.specs)))
            n += self.clients

    def start(self) -> list[asyncio.Task]:
        self._stop.clear()
        return [asyncio.create_task(self._client(k)) for k in range(self.clients)]

    async def stop(self, tasks: list[asyncio.Task]) -> None:
        self._stop.set()
        await asyncio.gather(*tasks)

    # -- accounting ---------------------------------------------------------------------------
    def mismatched(self, outcomes: list[Outcome]) -> list[Outcome]:
        return [o for o in outcomes if o.error is None and o.tokens != self.expected[o.spec]]

    def window(self, t0: float, t1: float) -> list[Outcome]:
        """Requests that were in flight at some point in [t0, t1)."""
        return [o for o in self.outcomes if o.start < t1 and o.end >= t0]

    def longest_stall(self, t0: float, t1: float) -> float:
        """The longest time in [t0, t1] without a successfully completed request."""
        ends = sorted(o.end for o in self.outcomes if o.error is None and t0 <= o.end <= t1)
        marks = [t0, *ends, t1]
        return max(b - a for a, b in zip(marks, marks[1:]))


async def pool(base_url: str) -> dict:
    async with httpx.AsyncClient(timeout=10) as c:
        return (await c.get(base_url + "/load")).json()


async def busiest_decode(base_url: str) -> str:
    """The gRPC address of the decode worker running the most requests now."""
    loads = await pool(base_url)
    running = {k.split(":", 1)[1]: ((v.get("load") or {}).get("running_requests", 0)) + v.get("inflight", 0)
               for k, v in loads.items() if k.startswith("decode:")}
    return max(running, key=running.get)


async def wait_all_healthy(base_url: str, expected: int, timeout: float) -> float:
    """Seconds until the router has `expected` healthy workers (raises after timeout)."""
    t0 = time.monotonic()
    while True:
        loads = await pool(base_url)
        if sum(1 for v in loads.values() if v["healthy"]) == expected:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"workers not back after {timeout:.0f}s: {loads}")
        await asyncio.sleep(0.2)


async def wait_kv_idle(base_url: str, timeout: float) -> dict:
    """Wait until every worker reports no KV in use and nothing running; returns the last report."""
    deadline = time.monotonic() + timeout
    while True:
        loads = await pool(base_url)
        if all(v["load"] and not v["load"].get("kv_usage") and not v["load"].get("running_requests")
               for v in loads.values()):
            return loads
        if time.monotonic() > deadline:
            raise AssertionError(f"KV still in use {timeout:.0f}s after the load: {loads}")
        await asyncio.sleep(0.3)


def pid_of(processes: dict, grpc_address: str) -> int:
    return next(pid for pid, _, grpc in processes.values() if grpc == grpc_address)


def signal_pid(pid: int, sig: signal.Signals) -> None:
    os.kill(pid, sig)


@dataclass
class FaultRow:
    fault: str
    requests: int
    failed: int
    mismatched: int
    back_in_pool_s: float  # from the fault until the router routes to every worker again
    longest_stall_s: float  # longest time without a completed request, from the fault to the phase's end
    errors: list[str] = field(default_factory=list)


async def _wait_pool(base_url: str, healthy: int, at_most: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = sum(1 for v in (await pool(base_url)).values() if v["healthy"])
        if (n < healthy) if at_most else (n == healthy):
            return
        await asyncio.sleep(0.1)


async def run_fault_sequence(dep, load: Load, settle_s: float = 3.0, sigstop_s: float = 6.0,
                             back_timeout_s: float = 90.0) -> list[FaultRow]:
    """Under load: SIGKILL the busiest decode worker, then the (first) prefill worker, then SIGSTOP a decode
    worker for sigstop_s; each time wait until the pool is whole again plus settle_s."""
    workers = dep.prefill + dep.decode
    prefill_addr = next(grpc for name, (_, _, grpc) in dep.processes.items() if name.startswith("prefill"))
    tasks = load.start()
    rows = []
    try:
        await asyncio.sleep(settle_s)
        for fault in ("SIGKILL a decode worker", "SIGKILL the prefill worker", f"SIGSTOP a decode worker {sigstop_s:.0f} s"):
            addr = prefill_addr if "prefill" in fault else await busiest_decode(dep.base_url)
            pid = pid_of(dep.processes, addr)
            t0 = time.monotonic()
            if fault.startswith("SIGSTOP"):
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(sigstop_s)
                os.kill(pid, signal.SIGCONT)
            else:
                os.kill(pid, signal.SIGKILL)
                await _wait_pool(dep.base_url, workers, at_most=True, timeout=10)  # the router noticed
            await _wait_pool(dep.base_url, workers, at_most=False, timeout=back_timeout_s)
            back = time.monotonic() - t0
            await asyncio.sleep(settle_s)
            t1 = time.monotonic()
            seen = load.window(t0, t1)
            failed = [o for o in seen if o.error]
            rows.append(FaultRow(fault, len(seen), len(failed), len(load.mismatched(seen)), round(back, 1),
                                 round(load.longest_stall(t0, t1), 1), sorted({o.error for o in failed})[:3]))
    finally:
        await load.stop(tasks)
    return rows
