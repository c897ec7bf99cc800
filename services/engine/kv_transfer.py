"""Moving one request's KV from a prefill worker P into a decode worker D's paged cache.

D side: `KVLinkServer` hosts the store; `server.receiver(peer)` is the live link to one P (a fresh epoch
after a failure); `receiver.expect(...)` registers a transfer BEFORE D asks P to prefill, and returns a
handle whose future completes once every layer's tokens are in D's cache.
P side: `KVLinkClient.sender(address)` joins the link D named; the model runner calls `send_prefix` /
`send_layer` (from ForwardContext.on_layer_done) and `finish`. Each call copies the tokens out of P's
cache before returning, so later steps may overwrite those slots; one thread per link sends in order.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from math import prod
from typing import Sequence

import torch
import torch.distributed as dist

from glmserve.engine.kv_link import (
    D_RANK, P_RANK, Channel, KVLinkError, Sending, KVTransferCancelled, KVTransferError, LinkAddress, LinkEvent,
    LinkObserver, connect_host, local_address_towards, notify,
)
from glmserve.engine.kv_wire import (
    CANCEL, CLOSE, DONE, HEARTBEAT, KV, Header, block_size_of, gather_tokens, scatter_tokens, token_shape,
    token_slots,
)

log = logging.getLogger(__name__)

BlockIds = Sequence[int] | torch.Tensor


def _resolve(fut: Future, result=None, exc: BaseException | None = None) -> None:
    """Complete a future unless someone cancelled it meanwhile."""
    try:
        fut.set_exception(exc) if exc is not None else fut.set_result(result)
    except InvalidStateError:
        pass


def _side_stream(device: torch.device):
    """On CUDA a link thread works on its own stream, so its copies never queue behind the model's kernels."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    torch.cuda.set_device(device)
    return torch.cuda.stream(torch.cuda.Stream(device))


def _client_store(address: LinkAddress, connect_timeout_s: float) -> dist.TCPStore:
    # One store connection per link: TCPStore serialises a client's calls, and link setup blocks in get().
    td = datetime.timedelta(seconds=connect_timeout_s)
    return dist.TCPStore(connect_host(address.host), address.port, None, False, td)


# ----------------------------------------------------------------------------------------------- P side


@dataclass
class _Msg:
    header: Header
    payload: torch.Tensor | None = None
    ready: "torch.cuda.Event | None" = None  # the gather on P's compute stream finished
    buffer: torch.Tensor | None = None  # pooled storage of payload, recycled once sent
    future: Future | None = None  # DONE: resolved once everything before it is sent


@dataclass
class _Outgoing:
    started: float
    bytes: int = 0
    future: Future | None = None


class KVSender:
    """P's end of one link. Link failures never raise from send_*: they fail the finish() futures."""

    def __init__(self, address: LinkAddress, device: torch.device | str = "cpu", *, label: str | None = None,
                 timeout_s: float = 30.0, connect_timeout_s: float = 60.0, observer: LinkObserver | None = None,
                 max_queued_bytes: int = 512 << 20, heartbeat_s: float | None = None, pool_bytes: int | None = None):
        self.address = address
        self._connect_timeout_s = connect_timeout_s
        self.label = label or f"{address.host}:{address.port}"
        self.device = torch.device(device)
        self.bytes_sent = 0
        self.backend: str | None = None
        self.error: KVLinkError | None = None
        self._timeout_s, self._heartbeat_s, self._observer = timeout_s, heartbeat_s, observer
        self._max_queued = max_queued_bytes
        self._cv = threading.Condition()
        self._queue: deque[_Msg] = deque()
        self._queued_bytes = 0
        self._open: dict[int, _Outgoing] = {}
        self._cancelled: OrderedDict[int, None] = OrderedDict()
        self._closing = False
        # Sent payload buffers are reused: fresh memory costs page faults (a gather into new memory was
        # ~6x slower than into reused memory on CPU). By default the pool keeps the queue's high-water mark.
        self._pool: list[torch.Tensor] = []
        self._pool_bytes = max_queued_bytes if pool_bytes is None else pool_bytes
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{address.name}", daemon=True)
        self._thread.start()

    @property
    def broken(self) -> bool:
        return self.error is not None

    def send_prefix(self, transfer_id: int, kv_caches: Sequence[torch.Tensor], block_ids: BlockIds,
                    num_tokens: int) -> None:
        """KV of tokens 0..num_tokens-1 of every layer (prefix-cache hits P did not compute)."""
        for layer, cache in enumerate(kv_caches):
            self.send_layer(transfer_id, layer, cache, block_ids, 0, num_tokens)

    def send_layer(self, transfer_id: int, layer: int, kv_cache_of_layer: torch.Tensor, block_ids: BlockIds,
                   start: int, count: int) -> None:
        """Queue tokens start..start+count-1 of one layer; they are copied out before this returns."""
        if count <= 0 or self._dropped(transfer_id):
            return
        cache = kv_cache_of_layer
        blk, off = token_slots(block_ids, block_size_of(cache), start, count, cache.device)
        nbytes = count * prod(token_shape(cache)) * cache.element_size()
        buf = self._buffer(nbytes, cache.device)
        payload = gather_tokens(cache, blk, off, out=buf[:nbytes].view(cache.dtype))
        ready = None
        if payload.is_cuda:  # the sender thread waits for this copy only, not for the rest of the step
            ready = torch.cuda.Event()
            ready.record()
        msg = _Msg(Header(KV, transfer_id, layer, start, count, payload.numel(), payload.dtype), payload, ready, buf)
        if not self._put(msg):
            self._recycle(buf)

    def finish(self, transfer_id: int) -> Future:
        """Future of the bytes sent for the transfer, done once all of it is on the wire."""
        fut: Future = Future()
        with self._cv:
            if self.error is not None or self._closing:
                fut.set_exception(self.error or KVLinkError(f"KV link {self.address} is closing"))
            elif transfer_id in self._cancelled:
                fut.cancel()
            else:
                self._open.setdefault(transfer_id, _Outgoing(time.monotonic())).future = fut
                self._queue.append(_Msg(Header(DONE, transfer_id), future=fut))
                self._cv.notify_all()
        return fut

    def cancel(self, transfer_id: int) -> None:
        """Drop what is still queued for the transfer and tell D; later send_* calls for it are ignored."""
        with self._cv:
            if transfer_id in self._cancelled:
                return
            self._cancelled[transfer_id] = None
            while len(self._cancelled) > 4096:  # only late calls of recent transfers need catching
                self._cancelled.popitem(last=False)
            self._queue = deque(m for m in self._queue if m.header.transfer_id != transfer_id)
            self._queued_bytes = sum(m.header.nbytes for m in self._queue)
            out = self._open.pop(transfer_id, None)
            if self.error is None:
                self._queue.append(_Msg(Header(CANCEL, transfer_id)))
            self._cv.notify_all()
        if out is not None and out.future is not None:
            out.future.cancel()

    def close(self, wait: bool = True) -> None:
        """Send what is queued, then tell D the link is closing."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if wait:
            self._thread.join(self._timeout_s)

    # -- internals

    def _dropped(self, transfer_id: int) -> bool:
        with self._cv:
            return self.error is not None or self._closing or transfer_id in self._cancelled

    def _buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        with self._cv:
            for i, b in enumerate(self._pool):
                if b.device == device and nbytes <= b.numel() <= 2 * nbytes:
                    return self._pool.pop(i)
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def _recycle(self, buf: torch.Tensor | None) -> None:
        if buf is None:
            return
        with self._cv:
            self._pool.append(buf)
            while sum(b.numel() for b in self._pool) > self._pool_bytes:
                self._pool.pop(0)

    def _put(self, msg: _Msg) -> bool:
        n, tid = msg.header.nbytes, msg.header.transfer_id
        with self._cv:
            # Back-pressure: a slow link must not grow P's memory without bound (one message always fits).
            while self._queued_bytes and self._queued_bytes + n > self._max_queued and self.error is None:
                self._cv.wait()
            if self.error is not None or tid in self._cancelled:
                return False
            self._open.setdefault(tid, _Outgoing(time.monotonic()))
            self._queue.append(msg)
            self._queued_bytes += n
            self._cv.notify_all()
            return True

    def _take(self, timeout: float) -> _Msg | None:
        with self._cv:
            if not self._queue and not self._closing:
                self._cv.wait(timeout)
            if not self._queue:
                return None
            msg = self._queue.popleft()
            self._queued_bytes -= msg.header.nbytes
            self._cv.notify_all()
            return msg

    def _run(self) -> None:
        try:
            with _side_stream(self.device):
                self._serve()
        except Exception as e:  # noqa: BLE001 - any failure of the link ends it
            self._fail(e)
        else:
            self._fail(KVLinkError(f"KV link {self.address} closed"), quiet=True)

    def _serve(self) -> None:
        store = _client_store(self.address, self._connect_timeout_s)
        gloo_host = local_address_towards(connect_host(self.address.host), self.address.port)
        ch = Channel(store, self.address.name, P_RANK, self.device, self._timeout_s, gloo_host,
                     self._connect_timeout_s, stop=lambda: self._closing)
        self.backend = ch.backend
        beat = self._heartbeat_s or min(self._timeout_s, ch.peer_info["timeout_s"]) / 4
        # Two messages in flight: the next one is posted before the last one is confirmed, so D never
        # waits for this thread to wake up between messages.
        in_flight: deque[tuple[Sending, _Msg]] = deque()
        while True:
            msg = self._take(0 if in_flight else beat)
            if msg is not None:
                if msg.ready is not None:
                    msg.ready.synchronize()
                in_flight.append((ch.post(msg.header.encode(), msg.payload), msg))
                if len(in_flight) > 1:
                    self._sent(*in_flight.popleft())
            elif in_flight:
                self._sent(*in_flight.popleft())
            elif self._closing:
                ch.send(Header(CLOSE).encode())
                return
            else:
                ch.send(Header(HEARTBEAT).encode())

    def _sent(self, sending: Sending, msg: _Msg) -> None:
        sending.wait()
        h = msg.header
        if msg.payload is not None:
            self._recycle(msg.buffer)
            with self._cv:
                self.bytes_sent += h.nbytes
                if (out := self._open.get(h.transfer_id)) is not None:
                    out.bytes += h.nbytes
            notify(self._observer, LinkEvent(self.label, "bytes", "send", h.nbytes))
        if h.kind == DONE:
            with self._cv:
                out = self._open.pop(h.transfer_id, None)
            if out is not None:
                notify(self._observer, LinkEvent(self.label, "latency", "send", time.monotonic() - out.started))
                _resolve(msg.future, out.bytes)

    def _fail(self, e: Exception, quiet: bool = False) -> None:
        err = e if isinstance(e, KVLinkError) else KVLinkError(f"KV link {self.address} broke: {e}")
        with self._cv:
            self.error = err
            failed = list(self._open.values())
            self._open.clear()
            self._queue.clear()
            self._queued_bytes = 0
            self._pool.clear()
            self._cv.notify_all()
        if not quiet or failed:
            log.warning("%s (%d transfers failed)", err, len(failed))
        for out in failed:
            if out.future is not None:
                _resolve(out.future, exc=err)
        if failed:
            notify(self._observer, LinkEvent(self.label, "failure", "send", len(failed)))


class KVLinkClient:
    """P's links, one live link per decode worker, made on the first request that names it."""

    def __init__(self, device: torch.device | str = "cpu", *, timeout_s: float = 30.0,
                 connect_timeout_s: float = 60.0, observer: LinkObserver | None = None,
                 max_queued_bytes: int = 512 << 20):
        self._kw = dict(device=device, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
                        observer=observer, max_queued_bytes=max_queued_bytes)
        self._lock = threading.Lock()
        self._senders: dict[tuple[str, int], KVSender] = {}

    def sender(self, address: LinkAddress) -> KVSender:
        key = (address.host, address.port)
        with self._lock:
            old = self._senders.get(key)
            if old is not None and old.address == address and not old.broken:
                return old
            if old is not None:  # D moved to a new epoch: the old link is dead or about to be
                old.close(wait=False)
            new = self._senders[key] = KVSender(address, **self._kw)
            return new

    def close(self) -> None:
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
        for s in senders:
            s.close()


# ----------------------------------------------------------------------------------------------- D side


class _Coverage:
    """Which (layer, token) pairs arrived; overlapping or out-of-range data is a protocol error."""

    def __init__(self, num_layers: int, num_tokens: int):
        self.num_layers, self.num_tokens = num_layers, num_tokens
        self.remaining = num_layers * num_tokens
        self._spans: list[list[list[int]]] = [[] for _ in range(num_layers)]

    def add(self, layer: int, start: int, count: int) -> None:
        end = start + count
        if not 0 <= layer < self.num_layers or end > self.num_tokens:
            raise ValueError(f"layer {layer} tokens {start}..{end} outside {self.num_layers}x{self.num_tokens}")
        spans = self._spans[layer]
        if any(start < e and s < end for s, e in spans):
            raise ValueError(f"layer {layer} tokens {start}..{end} arrived twice")
        if spans and spans[-1][1] == start:
            spans[-1][1] = end  # chunks usually come in order: keep the list short
        else:
            spans.append([start, end])
        self.remaining -= count


@dataclass(eq=False)
class TransferHandle:
    """D's view of one transfer. future: bytes received, or a KVTransferError."""

    receiver: "KVReceiver"
    transfer_id: int
    kv_caches: Sequence[torch.Tensor]
    block_ids: torch.Tensor
    coverage: _Coverage
    future: Future = field(default_factory=Future)
    bytes_received: int = 0
    started: float = field(default_factory=time.monotonic)

    def done(self) -> bool:
        return self.future.done()

    def wait(self, timeout: float | None = None) -> int:
        return self.future.result(timeout)

    def cancel(self) -> None:
        self.receiver.cancel(self.transfer_id)

    def _apply(self, h: Header, payload: torch.Tensor) -> None:
        if not 0 <= h.layer < self.coverage.num_layers:
            raise ValueError(f"layer {h.layer} out of range")
        cache = self.kv_caches[h.layer]
        shape = token_shape(cache)
        if h.dtype != cache.dtype or h.numel != h.count * prod(shape):
            raise ValueError(f"payload {h.numel} x {h.dtype} does not fit {h.count} tokens of {shape} x {cache.dtype}")
        self.coverage.add(h.layer, h.start, h.count)
        values = payload.view(h.dtype).view(h.count, *shape).to(cache.device)
        blk, off = token_slots(self.block_ids, block_size_of(cache), h.start, h.count, cache.device)
        scatter_tokens(cache, blk, off, values)
        if cache.is_cuda:  # done before the lock is released: a cancel may hand these blocks to another request
            torch.cuda.current_stream(cache.device).synchronize()
        self.bytes_received += h.nbytes


class KVReceiver:
    """D's end of one link; its thread receives in order and scatters into the expected transfers."""

    def __init__(self, address: LinkAddress, device: torch.device | str = "cpu", *, label: str | None = None,
                 timeout_s: float = 30.0, connect_timeout_s: float = 60.0, observer: LinkObserver | None = None):
        self.address = address
        self.label = label or address.name
        self._connect_timeout_s = connect_timeout_s
        self.device = torch.device(device)
        self.bytes_received = 0
        self.bytes_dropped = 0  # part of bytes_received: data of unknown or cancelled transfers
        self.backend: str | None = None
        self.error: KVLinkError | None = None
        self.connected = threading.Event()
        self._timeout_s, self._observer = timeout_s, observer
        self._lock = threading.Lock()
        self._pending: dict[int, TransferHandle] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kv-recv-{address.name}", daemon=True)
        self._thread.start()

    @property
    def broken(self) -> bool:
        return self.error is not None

    def new_transfer_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def expect(self, transfer_id: int, kv_caches: Sequence[torch.Tensor], dst_block_ids: BlockIds,
               num_tokens: int, num_layers: int) -> TransferHandle:
        """Register a transfer before P may send it (data for unknown ids is dropped)."""
        ids = torch.as_tensor(dst_block_ids, dtype=torch.int64)
        if num_layers > len(kv_caches) or -(-num_tokens // block_size_of(kv_caches[0])) > ids.numel():
            raise ValueError(f"{num_tokens} tokens x {num_layers} layers do not fit the given caches/blocks")
        handle = TransferHandle(self, transfer_id, list(kv_caches[:num_layers]), ids, _Coverage(num_layers, num_tokens))
        with self._lock:
            if self.error is not None:
                raise self.error
            if self._closed:
                raise KVLinkError(f"KV link {self.address} is closed")
            if transfer_id in self._pending:
                raise ValueError(f"transfer {transfer_id} is already expected")
            if handle.coverage.remaining == 0:
                handle.future.set_result(0)
            else:
                self._pending[transfer_id] = handle
        return handle

    def cancel(self, transfer_id: int) -> None:
        """After this returns nothing more is written into the transfer's blocks."""
        with self._lock:  # waits for a scatter in progress
            handle = self._pending.pop(transfer_id, None)
        if handle is not None:
            _resolve(handle.future, exc=KVTransferCancelled(f"transfer {transfer_id} cancelled by the decode side"))

    def close(self) -> None:
        """Fail pending transfers now; the thread ends at the next message (P heartbeats) or link error."""
        with self._lock:
            self._closed = True
        self._break(KVLinkError(f"KV link {self.address} closed by the decode side"))

    # -- internals

    def _run(self) -> None:
        try:
            with _side_stream(self.device):
                self._serve()
        except Exception as e:  # noqa: BLE001 - any failure of the link ends it
            self._break(e)

    def _serve(self) -> None:
        store = _client_store(self.address, self._connect_timeout_s)
        ch = Channel(store, self.address.name, D_RANK, self.device, self._timeout_s, self.address.host,
                     self._connect_timeout_s, stop=lambda: self._closed)
        self.backend = ch.backend
        self.connected.set()
        # A two-stage pipeline in one thread: the scatter of one payload runs while the next one lands.
        header_work = ch.post_header_recv()
        landed = None  # (header, payload) received but not scattered yet
        slot = 0
        while not self._closed:
            if landed is not None and not header_work.is_completed():
                self._scatter(*landed)  # nothing new yet: finish what we have before blocking
                landed = None
            header_work.wait()
            h = Header.decode(ch.header)
            if h.kind == KV:
                payload_work, payload = ch.post_payload_recv(h.nbytes, slot)  # always drained: stays in step
                slot ^= 1
                header_work = ch.post_header_recv()  # gloo matches receives in posting order
                if landed is not None:
                    self._scatter(*landed)
                payload_work.wait()
                landed = (h, payload)
                continue
            if landed is not None:
                self._scatter(*landed)
                landed = None
            if h.kind in (DONE, CANCEL):
                self._on_end(h)
            elif h.kind == CLOSE:
                raise KVLinkError(f"KV link {self.address} closed by the prefill side")
            elif h.kind != HEARTBEAT:
                raise ValueError(f"unknown KV link message kind {h.kind}")
            header_work = ch.post_header_recv()

    def _scatter(self, h: Header, payload: torch.Tensor) -> None:
        done = bad = None
        with self._lock:
            self.bytes_received += h.nbytes  # counted here, with bytes_dropped, so the two always agree
            handle = self._pending.get(h.transfer_id)
            if handle is None:
                self.bytes_dropped += h.nbytes
            else:
                try:
                    handle._apply(h, payload)
                except ValueError as e:
                    bad = (self._pending.pop(h.transfer_id), e)
                else:
                    if handle.coverage.remaining == 0:
                        done = self._pending.pop(h.transfer_id)
        notify(self._observer, LinkEvent(self.label, "bytes", "recv", h.nbytes))
        if done is not None:
            notify(self._observer, LinkEvent(self.label, "latency", "recv", time.monotonic() - done.started))
            _resolve(done.future, done.bytes_received)
        if bad is not None:
            notify(self._observer, LinkEvent(self.label, "failure", "recv", 1))
            _resolve(bad[0].future, exc=KVTransferError(f"transfer {h.transfer_id}: bad data from P: {bad[1]}"))

    def _on_end(self, h: Header) -> None:
        with self._lock:
            handle = self._pending.pop(h.transfer_id, None)
        if handle is None:
            return
        if h.kind == CANCEL:
            _resolve(handle.future, exc=KVTransferCancelled(f"transfer {h.transfer_id} cancelled by the prefill side"))
            return
        missing = handle.coverage.remaining
        notify(self._observer, LinkEvent(self.label, "failure", "recv", 1))
        err = KVTransferError(f"transfer {h.transfer_id}: P finished, {missing} token-layers missing")
        _resolve(handle.future, exc=err)

    def _break(self, e: Exception) -> None:
        err = e if isinstance(e, KVLinkError) else KVLinkError(f"KV link {self.address} broke: {e}")
        with self._lock:
            if self.error is None:
                self.error = err
            failed = list(self._pending.values())
            self._pending.clear()
        if failed:
            log.warning("%s (%d transfers failed)", err, len(failed))
            notify(self._observer, LinkEvent(self.label, "failure", "recv", len(failed)))
        for handle in failed:
            _resolve(handle.future, exc=self.error)


class KVLinkServer:
    """D's KV port: hosts the TCPStore every P joins through; one live receiver per prefill peer."""

    def __init__(self, host: str, port: int, device: torch.device | str = "cpu", *, timeout_s: float = 30.0,
                 connect_timeout_s: float = 60.0, observer: LinkObserver | None = None):
        td = datetime.timedelta(seconds=connect_timeout_s)
        self._store = dist.TCPStore(host, port, None, True, td, wait_for_workers=False)
        self.host, self.port = host, self._store.port  # port 0 picks a free one
        self._kw = dict(device=device, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, observer=observer)
        self._token = secrets.token_hex(3)  # names stay unique across restarts of D on the same port
        self._epochs = itertools.count(1)
        self._lock = threading.Lock()
        self._links: dict[str, KVReceiver] = {}

    def receiver(self, peer: str) -> KVReceiver:
        """The live link to prefill worker `peer`; a new epoch when the last one broke."""
        with self._lock:
            rx = self._links.get(peer)
            if rx is None or rx.broken:
                name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', peer)}.{self._token}.e{next(self._epochs)}"
                rx = self._links[peer] = KVReceiver(LinkAddress(self.host, self.port, name), label=peer, **self._kw)
            return rx

    def links(self) -> dict[str, KVReceiver]:
        with self._lock:
            return dict(self._links)

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for rx in links:
            rx.close()
