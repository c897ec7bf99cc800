"""One KV link endpoint: a private 2-rank torch.distributed group between a prefill worker P and a
decode worker D, built without a global default group (each worker talks to many peers).

D (rank 0) hosts a TCPStore; each link lives under its own PrefixStore named by D (the name carries an
epoch, so a broken link is never reused). Headers always go over gloo: a dead peer shows up there as
"connection closed" at once, a stalled one as a recv timeout (P heartbeats keep an idle link inside
it). Payloads go over NCCL when both ends hold their cache on CUDA, else over the same gloo group,
staged through host memory. NCCL ops are only posted once a gloo header said data is coming, so an
idle link never trips NCCL's watchdog. (The NCCL path needs two GPUs; CI exercises the shared code
with gloo.)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import socket
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch
import torch.distributed as dist

from glmserve.engine.kv_wire import HEADER_LEN

if TYPE_CHECKING:
    from glmserve.metrics import ServiceMetrics

log = logging.getLogger(__name__)

D_RANK, P_RANK = 0, 1
_TAG = 0  # one ordered stream per link: everything uses the same tag


class KVTransferError(RuntimeError):
    """A KV transfer failed; the more specific errors below say why."""


class KVLinkError(KVTransferError):
    """The link broke (peer died, timed out, or closed); every pending transfer on it failed."""


class KVTransferCancelled(KVTransferError):
    """The transfer was cancelled by one of the two sides."""


@dataclass(frozen=True)
class LinkAddress:
    """What D tells P so that P can join the link: D's store address and the link's name."""

    host: str
    port: int
    name: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.name}"


@dataclass(frozen=True)
class LinkEvent:
    """A measurement for metrics. `link` is a stable label (peer), not the per-epoch name."""

    link: str
    kind: Literal["bytes", "latency", "failure"]
    direction: Literal["send", "recv"]
    value: float


LinkObserver = Callable[[LinkEvent], None]


def notify(observer: LinkObserver | None, event: LinkEvent) -> None:
    """Metrics must never break a link."""
    if observer is None:
        return
    try:
        observer(event)
    except Exception:  # noqa: BLE001
        log.exception("KV link observer failed on %s", event)


def prometheus_observer(metrics: "ServiceMetrics") -> LinkObserver:
    """Feeds `glmserve:kv_transfer_*` of a service's metrics."""

    def observe(ev: LinkEvent) -> None:
        if ev.kind == "bytes":
            metrics.get("kv_transfer_bytes", link=ev.link, direction=ev.direction).inc(ev.value)
            metrics.get("kv_transfer_failures", link=ev.link)  # the series exists (at 0) from the first transfer
        elif ev.kind == "latency":
            metrics.get("kv_transfer_latency_seconds", link=ev.link).observe(ev.value)
        else:
            metrics.get("kv_transfer_failures", link=ev.link).inc(ev.value)

    return observe


def local_address_towards(host: str, port: int) -> str:
    """The local IP the kernel would use to reach host (no packet is sent): gloo must listen there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _gloo_device(host: str):
    if host in ("", "0.0.0.0", "::"):
        return dist.ProcessGroupGloo.create_default_device()
    return dist.ProcessGroupGloo.create_device(hostname=host)


def connect_host(host: str) -> str:
    """Where a local client reaches a server that was told to listen on host."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _wants_nccl(device: torch.device) -> bool:
    return device.type == "cuda" and dist.is_nccl_available()


class Channel:
    """A connected link endpoint: ordered header and payload send/recv to the one peer."""

    def __init__(self, store: dist.Store, name: str, rank: int, device: torch.device, timeout_s: float,
                 gloo_host: str, connect_timeout_s: float, stop: Callable[[], bool] = lambda: False):
        self.name, self.rank, self.peer = name, rank, 1 - rank
        self.device = device
        td = datetime.timedelta(seconds=timeout_s)  # per send/recv, once connected
        link_store = dist.PrefixStore(name, store)
        link_store.set(f"info/{rank}", json.dumps({"nccl": _wants_nccl(device), "timeout_s": timeout_s}))
        # Poll rather than block in get(): a link closed while still waiting for its peer ends promptly.
        deadline = time.monotonic() + connect_timeout_s
        while not link_store.check([f"info/{self.peer}"]):
            if stop():
                raise KVLinkError(f"KV link {name} closed before the peer joined")
            if time.monotonic() > deadline:
                raise KVLinkError(f"KV link {name}: peer did not join within {connect_timeout_s:.0f} s")
            time.sleep(0.02)
        self.peer_info = json.loads(link_store.get(f"info/{self.peer}"))
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [_gloo_device(gloo_host)]
        # The constructor blocks until the peer has joined (rendezvous through the store): that is still
        # connecting, so it gets the connect timeout; a busy machine can take seconds to get a fresh peer there.
        opts._timeout = datetime.timedelta(seconds=connect_timeout_s)
        self.ctrl = dist.ProcessGroupGloo(dist.PrefixStore("gloo", link_store), rank, 2, opts)
        # Gloo fixes its own op timeout at construction, so every wait passes this one: what a stalled peer
        # is given once connected.
        self.op_timeout = td
        self.backend = "nccl" if _wants_nccl(device) and self.peer_info["nccl"] else "gloo"
        self.data = self.ctrl
        if self.backend == "nccl":
            nopts = dist.ProcessGroupNCCL.Options()
            nopts.is_high_priority_stream = False
            nopts._timeout = td
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", link_store), rank, 2, nopts)
        # Payload buffers live where the data group can reach them.
        self.wire_device = device if self.backend == "nccl" else torch.device("cpu")
        self.header = torch.zeros(HEADER_LEN, dtype=torch.int64)  # filled by the last completed header recv
        self._buffers = [torch.empty(0, dtype=torch.uint8, device=self.wire_device) for _ in range(2)]

    def post(self, header: torch.Tensor, payload: torch.Tensor | None = None) -> "Sending":
        """Start sending one message. Header and payload are posted together: no extra round trip."""
        tensors = [header]
        works = [self.ctrl.send([header], self.peer, _TAG)]
        if payload is not None:
            flat = payload.reshape(-1).view(torch.uint8)  # bytes: works for every dtype, fp8 included
            if flat.device != self.wire_device:
                flat = flat.to(self.wire_device)
            tensors.append(flat)
            works.append(self.data.send([flat], self.peer, _TAG))
        return Sending(works, tensors, self)

    def send(self, header: torch.Tensor, payload: torch.Tensor | None = None) -> None:
        self.post(header, payload).wait()

    def wait(self, work: dist.Work, payload: bool = False) -> None:
        """Wait for a posted receive, failing after the link timeout if the peer stalls. An NCCL payload
        keeps its plain wait (stream ordering; NCCL's own watchdog has the timeout)."""
        if payload and self.backend == "nccl":
            work.wait()
        else:
            work.wait(self.op_timeout)

    def post_header_recv(self) -> dist.Work:
        return self.ctrl.recv([self.header], self.peer, _TAG)

    def post_payload_recv(self, nbytes: int, slot: int) -> tuple[dist.Work, torch.Tensor]:
        """Receive into reused buffer `slot` (0 or 1): one can be scattered while the next one lands.
        On NCCL, wait() orders the current stream after the receive."""
        if self._buffers[slot].numel() < nbytes:
            self._buffers[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.wire_device)
        buf = self._buffers[slot][:nbytes]
        return self.data.recv([buf], self.peer, _TAG), buf

    def post_recv_into(self, target: torch.Tensor) -> dist.Work:
        """Receive a payload straight into `target` (contiguous, on the wire device): no staging copy."""
        return self.data.recv([target.view(-1).view(torch.uint8)], self.peer, _TAG)


@dataclass
class Sending:
    """A message on its way; its tensors must stay untouched until wait() returns."""

    works: list  # the header's, then the payload's if any
    tensors: list[torch.Tensor]
    channel: Channel

    def wait(self) -> None:
        for i, work in enumerate(self.works):
            self.channel.wait(work, payload=i > 0)
        if self.channel.backend == "nccl" and len(self.works) > 1:
            torch.cuda.current_stream(self.channel.device).synchronize()  # NCCL wait() only orders streams


# -- helpers shared by the two ends of a link ---------------------------------------------------

BlockIds = Sequence[int] | torch.Tensor


def resolve_future(fut: Future, result=None, exc: BaseException | None = None) -> None:
    """Complete a future unless someone cancelled it meanwhile."""
    try:
        fut.set_exception(exc) if exc is not None else fut.set_result(result)
    except InvalidStateError:
        pass


def side_stream(device: torch.device):
    """On CUDA a link thread works on its own stream, so its copies never queue behind the model's kernels."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    torch.cuda.set_device(device)
    return torch.cuda.stream(torch.cuda.Stream(device))


def client_store(address: LinkAddress, connect_timeout_s: float) -> dist.TCPStore:
    # One store connection per link: TCPStore serialises a client's calls, and link setup blocks in get().
    td = datetime.timedelta(seconds=connect_timeout_s)
    return dist.TCPStore(connect_host(address.host), address.port, None, False, td)


def kv_link_device(kv_transfer_backend: str, engine_device) -> torch.device:
    """Where a link's buffers live: the engine's device for NCCL (and auto), the host for gloo."""
    if kv_transfer_backend == "gloo":
        return torch.device("cpu")
    if kv_transfer_backend == "nccl" and torch.device(engine_device).type != "cuda":
        raise ValueError("--kv-transfer-backend nccl needs the model on CUDA")
    return torch.device(engine_device)
