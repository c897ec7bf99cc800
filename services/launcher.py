"""`glmserve up`: a router, prefill and decode workers as separate local processes, supervised like a process
manager: one that exits is restarted (with backoff) at the same address and rejoins the router's pool;
only Ctrl-C / SIGTERM / SIGHUP stops the deployment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Iterator

from glmserve.local_ports import free_ports
from glmserve.supervisor import Supervisor


class StartupFailed(RuntimeError):
    """A process of the deployment did not come up (the reason is in its own output)."""


@dataclass(frozen=True)
class LaunchPlan:
    model: str
    num_prefill: int = 1
    num_decode: int = 1
    port: int = 8000
    host: str = "127.0.0.1"
    worker_args: tuple[str, ...] = ()  # engine flags passed to every worker
    router_args: tuple[str, ...] = ()
    prefill_args: tuple[str, ...] = ()  # flags for the prefill workers only, after worker_args (they win)
    decode_args: tuple[str, ...] = ()
    ready_timeout: float = 600.0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    ready_url: str
    grpc_address: str = ""
    args: tuple[str, ...] = ()  # the glmserve command line, to restart it the same way

    def describe(self) -> str:
        return f"{self.name} pid={self.popen.pid} ready={self.ready_url} grpc={self.grpc_address or '-'}"


def _spawn(name: str, args: list[str], ready_url: str, grpc_address: str = "") -> Proc:
    return Proc(name, _popen(args), ready_url, grpc_address, tuple(args))


def _popen(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "glmserve.cli", *args], start_new_session=True)


def respawn(p: Proc) -> None:
    """Start p again with its own command line (same ports, so the router finds it where it was)."""
    p.popen = _popen(p.args)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass(frozen=True)
class ProcessSpec:
    """One process of the plan: `glmserve ARGS...`, ready once `ready_url` answers 200."""

    name: str
    args: tuple[str, ...]
    ready_url: str
    grpc_address: str = ""


def process_specs(plan: LaunchPlan, ports: Iterator[int]) -> list[ProcessSpec]:
    """The command lines `start` runs, workers first; `ports` gives each worker its gRPC and HTTP port."""
    specs: list[ProcessSpec] = []
    addrs: dict[str, list[str]] = {"prefill": [], "decode": []}
    common = ("--model", plan.model, "--host", plan.host, *plan.worker_args)
    for role, count in (("prefill", plan.num_prefill), ("decode", plan.num_decode)):
        for i in range(count):
            grpc_port, http_port = next(ports), next(ports)
            # Only the prefill workers dial the KV port, and D tells them which one: the kernel may pick it.
            kv = ("--kv-port", "0") if role == "decode" else ()
            own = plan.prefill_args if role == "prefill" else plan.decode_args
            specs.append(ProcessSpec(f"{role}-{i}", (role, *common, *own, "--grpc-port", str(grpc_port),
                                                     "--http-port", str(http_port), *kv),
                                     f"http://{plan.host}:{http_port}/ready", f"{plan.host}:{grpc_port}"))
            addrs[role].append(f"{plan.host}:{grpc_port}")
    specs.append(ProcessSpec("router", ("router", "--model", plan.model, "--host", plan.host, "--port", str(plan.port),
                                        "--prefill", ",".join(addrs["prefill"]), "--decode", ",".join(addrs["decode"]),
                                        *plan.router_args), f"http://{plan.host}:{plan.port}/health"))
    return specs


def start(plan: LaunchPlan) -> list[Proc]:
    ports = iter(free_ports(2 * (plan.num_prefill + plan.num_decode), plan.host))
    return [_spawn(s.name, list(s.args), s.ready_url, s.grpc_address) for s in process_specs(plan, ports)]


def routable_workers(router_url: str) -> int:
    """How many workers the router has in its pool (healthy) right now; 0 when it does not answer."""
    try:
        with urllib.request.urlopen(f"{router_url}/load", timeout=1) as r:
            return sum(1 for w in json.load(r).values() if w.get("healthy"))
    except (OSError, ValueError):
        return 0


def wait_ready(procs: list[Proc], timeout: float, router_url: str | None = None) -> None:
    """Every process answers its readiness URL and, given router_url, the router routes to every worker
    (its /health needs only one of each role; "up" means all of them)."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending:
        for p in list(pending):
            if p.popen.poll() is not None:
                raise StartupFailed(f"{p.name} exited with code {p.popen.returncode} while starting (its error is above)")
            if _ready(p.ready_url):
                pending.remove(p)
        if time.monotonic() > deadline:
            raise StartupFailed(f"not ready after {timeout:.0f}s: {', '.join(p.name for p in pending)}")
        time.sleep(0.2)
    workers = sum(1 for p in procs if p.grpc_address)
    while router_url is not None and (routable := routable_workers(router_url)) < workers:
        if time.monotonic() > deadline:
            raise StartupFailed(f"the router reaches only {routable} of {workers} workers after {timeout:.0f}s")
        time.sleep(0.2)


def stop(procs: list[Proc], grace: float = 10.0) -> None:
    for p in procs:
        if p.popen.poll() is None:
            os.killpg(p.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.popen.pid, signal.SIGKILL)
            p.popen.wait()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def run_up(plan: LaunchPlan) -> int:
    # Ctrl-C, `kill` and a closed terminal all stop every process we start (they run in their own
    # sessions, so nothing else would reach them); SIGINT may arrive ignored when started in background.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    procs = start(plan)
    try:
        wait_ready(procs, plan.ready_timeout, router_url=f"http://{plan.host}:{plan.port}")
        for p in procs:
            print(p.describe(), flush=True)
        print(f"glmserve is up: OpenAI API at http://{plan.host}:{plan.port}/v1 "
              f"({plan.num_prefill} prefill + {plan.num_decode} decode workers). Ctrl-C stops everything.",
              flush=True)
        # The router routes around a dead worker (requests wait for one of its role, up to
        # --worker-wait-timeout) and takes it back once it answers again.
        supervisor = Supervisor(procs, respawn, log=lambda line: print(line, flush=True), now=time.monotonic())
        while True:
            supervisor.check(time.monotonic())
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 0
    finally:
        stop(procs)
