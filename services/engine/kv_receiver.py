"""The decode side of the KV link (D): `KVLinkServer` hosts the store; `server.receiver(peer)` is the live
link to one prefill worker (a fresh epoch after a failure); `receiver.expect(...)` registers a transfer
BEFORE D asks P to prefill and returns a handle whose future completes once every layer's tokens are in
D's cache."""

from __future__ import annotations

import datetime
import itertools
import logging
import re
import secrets
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from math import prod
from typing import Sequence

import torch
import torch.distributed as dist

from glmserve.engine.kv_link import (
    D_RANK, Channel, KVLinkError, KVTransferCancelled, KVTransferError, LinkAddress, LinkEvent, LinkObserver,
    notify, BlockIds, resolve_future, side_stream, client_store,
)
from glmserve.engine.kv_wire import (
    CANCEL, CLOSE, DONE, HEARTBEAT, KV, Header, block_size_of, blocks_as_tokens, consecutive_start, scatter_tokens,
    token_shape, token_slots,
)

log = logging.getLogger(__name__)


class _Coverage:
    """Which (layer, token) pairs arrived; overlapping or out-of-range data is a protocol error."""

    def __init__(self, num_layers: int, num_tokens: int, first_token: int = 0):
        self.num_layers, self.num_tokens, self.first_token = num_layers, num_tokens, first_token
        self.remaining = num_layers * max(0, num_tokens - first_token)
        self._spans: list[list[list[int]]] = [[] for _ in range(num_layers)]

    def add(self, layer: int, start: int, count: int) -> None:
        end = start + count
        if not 0 <= layer < self.num_layers or start < self.first_token or end > self.num_tokens:
            raise ValueError(f"layer {layer} tokens {start}..{end} outside {self.num_layers}x"
                             f"[{self.first_token}, {self.num_tokens})")
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

    def _check(self, h: Header) -> torch.Tensor:
        """Validate a KV message for this transfer and record its tokens as arrived; returns the layer's cache."""
        if not 0 <= h.layer < self.coverage.num_layers:
            raise ValueError(f"layer {h.layer} out of range")
        cache = self.kv_caches[h.layer]
        shape = token_shape(cache)
        if h.dtype != cache.dtype or h.numel != h.count * prod(shape):
            raise ValueError(f"payload {h.numel} x {h.dtype} does not fit {h.count} tokens of {shape} x {cache.dtype}")
        self.coverage.add(h.layer, h.start, h.count)
        return cache

    def _direct_target(self, h: Header) -> torch.Tensor | None:
        """The region of D's cache a whole-blocks message can land in as is (same block size, consecutive
        destination blocks, cache on the wire's device), or None. Checks the message first."""
        cache = self.kv_caches[h.layer] if 0 <= h.layer < self.coverage.num_layers else None
        if (cache is None or cache.is_cuda or h.block_size != block_size_of(cache) or not cache.is_contiguous()
                or h.dtype != cache.dtype):
            return None
        first, n = h.start // h.block_size, h.count // h.block_size
        if first + n > self.block_ids.numel():
            return None
        run = consecutive_start(self.block_ids[first : first + n])
        if run is None:
            return None
        self._check(h)
        return cache[run : run + n]

    def _apply(self, h: Header, payload: torch.Tensor) -> None:
        cache = self._check(h)
        shape = token_shape(cache)
        values = payload.view(h.dtype)
        if h.block_size == block_size_of(cache):  # whole blocks to blocks: copy block rows
            first, n = h.start // h.block_size, h.count // h.block_size
            dst = self.block_ids[first : first + n].to(cache.device)
            cache.index_copy_(0, dst, values.view(n, *cache.shape[1:]).to(cache.device))
        else:
            if h.block_size:
                values = blocks_as_tokens(values, shape, h.block_size)
            blk, off = token_slots(self.block_ids, block_size_of(cache), h.start, h.count, cache.device)
            scatter_tokens(cache, blk, off, values.view(h.count, *shape).to(cache.device))
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
        self.bytes_in_place = 0  # part of bytes_received: whole blocks received straight into the cache
        self.backend: str | None = None
        self.error: KVLinkError | None = None
        self.connected = threading.Event()
        self._timeout_s, self._observer = timeout_s, observer
        self._lock = threading.Lock()
        # Signalled when a payload that lands straight in a transfer's blocks has landed (cancel waits).
        self._landed = threading.Condition(self._lock)
        self._landing: int | None = None  # transfer id of the payload landing in its blocks now
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
               num_tokens: int, num_layers: int, first_token: int = 0) -> TransferHandle:
        """Register a transfer before P may send it (data for unknown ids is dropped). Tokens before
        first_token are already in the blocks (D's own prefix cache) and must not arrive."""
        ids = torch.as_tensor(dst_block_ids, dtype=torch.int64)
        if num_layers > len(kv_caches) or -(-num_tokens // block_size_of(kv_caches[0])) > ids.numel():
            raise ValueError(f"{num_tokens} tokens x {num_layers} layers do not fit the given caches/blocks")
        handle = TransferHandle(self, transfer_id, list(kv_caches[:num_layers]), ids, _Coverage(num_layers, num_tokens, first_token))
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
        """After this returns nothing more is written into the transfer's blocks (it waits for a scatter in
        progress, or for a payload already landing in the blocks, which P is sending at that moment)."""
        with self._lock:
            handle = self._pending.pop(transfer_id, None)
            while self._landing == transfer_id and self.error is None:
                self._landed.wait(1.0)
        if handle is not None:
            resolve_future(handle.future, exc=KVTransferCancelled(f"transfer {transfer_id} cancelled by the decode side"))

    def close(self) -> None:
        """Fail pending transfers now; the thread ends at the next message (P heartbeats) or link error."""
        with self._lock:
            self._closed = True
        self._break(KVLinkError(f"KV link {self.address} closed by the decode side"))

    # -- internals

    def _run(self) -> None:
        try:
            with side_stream(self.device):
                self._serve()
        except Exception as e:  # noqa: BLE001 - any failure of the link ends it
            self._break(e)

    def _serve(self) -> None:
        store = client_store(self.address, self._connect_timeout_s)
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
            ch.wait(header_work)
            h = Header.decode(ch.header)
            if h.kind == KV:
                if landed is not None and h.block_size:
                    self._scatter(*landed)  # before checking h: it may complete or fail the same transfer
                    landed = None
                target = self._land_directly(h) if h.block_size and ch.backend == "gloo" else None
                if target is not None:
                    payload_work, payload = ch.post_recv_into(target), None
                else:  # always drained: stays in step
                    payload_work, payload = ch.post_payload_recv(h.nbytes, slot)
                    slot ^= 1
                header_work = ch.post_header_recv()  # gloo matches receives in posting order
                if landed is not None:
                    self._scatter(*landed)
                try:
                    ch.wait(payload_work, payload=True)
                finally:
                    if target is not None:
                        self._landing_done(h)
                landed = None if target is not None else (h, payload)
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

    def _land_directly(self, h: Header) -> torch.Tensor | None:
        """Where a whole-blocks payload can be received in place (see TransferHandle._direct_target)."""
        with self._lock:
            handle = self._pending.get(h.transfer_id)
            if handle is None:
                return None
            try:
                target = handle._direct_target(h)
            except ValueError:
                return None  # received into staging; _scatter fails the transfer with the reason
            if target is not None:
                self._landing = h.transfer_id
            return target

    def _landing_done(self, h: Header) -> None:
        """Accounting of a payload that landed in place (as _scatter does for staged ones)."""
        done = None
        with self._lock:
            self._landing = None
            self._landed.notify_all()
            self.bytes_received += h.nbytes
            self.bytes_in_place += h.nbytes
            handle = self._pending.get(h.transfer_id)
            if handle is None:  # cancelled while landing: the data went into blocks it still held
                self.bytes_dropped += h.nbytes
            else:
                handle.bytes_received += h.nbytes
                if handle.coverage.remaining == 0:
                    done = self._pending.pop(h.transfer_id)
        self._after_payload(h, done)

    def _after_payload(self, h: Header, done: TransferHandle | None) -> None:
        """After a payload landed (outside the lock): count it, and complete its transfer if it was the last."""
        notify(self._observer, LinkEvent(self.label, "bytes", "recv", h.nbytes))
        if done is not None:
            notify(self._observer, LinkEvent(self.label, "latency", "recv", time.monotonic() - done.started))
            resolve_future(done.future, done.bytes_received)

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
        self._after_payload(h, done)
        if bad is not None:
            notify(self._observer, LinkEvent(self.label, "failure", "recv", 1))
            resolve_future(bad[0].future, exc=KVTransferError(f"transfer {h.transfer_id}: bad data from P: {bad[1]}"))

    def _on_end(self, h: Header) -> None:
        with self._lock:
            handle = self._pending.pop(h.transfer_id, None)
        if handle is None:
            return
        if h.kind == CANCEL:
            resolve_future(handle.future, exc=KVTransferCancelled(f"transfer {h.transfer_id} cancelled by the prefill side"))
            return
        missing = handle.coverage.remaining
        notify(self._observer, LinkEvent(self.label, "failure", "recv", 1))
        err = KVTransferError(f"transfer {h.transfer_id}: P finished, {missing} token-layers missing")
        resolve_future(handle.future, exc=err)

    def _break(self, e: Exception) -> None:
        err = e if isinstance(e, KVLinkError) else KVLinkError(f"KV link {self.address} broke: {e}")
        with self._lock:
            if self.error is None:
                self.error = err
            failed = list(self._pending.values())
            self._pending.clear()
            self._landing = None
            self._landed.notify_all()
        if failed:
            log.warning("%s (%d transfers failed)", err, len(failed))
            notify(self._observer, LinkEvent(self.label, "failure", "recv", len(failed)))
        for handle in failed:
            resolve_future(handle.future, exc=self.error)


def _listen(host: str, port: int) -> socket.socket:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart on the same port at once
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen for the KV link on {host}:{port}: {exc.strerror}") from exc
    sock.listen(512)
    return sock


class KVLinkServer:
    """D's KV port: hosts the TCPStore every P joins through; one live receiver per prefill peer."""

    def __init__(self, host: str, port: int, device: torch.device | str = "cpu", *, timeout_s: float = 30.0,
                 connect_timeout_s: float = 60.0, observer: LinkObserver | None = None):
        td = datetime.timedelta(seconds=connect_timeout_s)
        # TCPStore alone listens on every interface; hand it a socket bound to `host` only (the --host flag).
        sock = _listen(host, port)
        try:
            self._store = dist.TCPStore(host, sock.getsockname()[1], None, True, td, wait_for_workers=False,
                                        master_listen_fd=sock.fileno())
        except BaseException:
            sock.close()
            raise
        # The store owns the listening fd now and closes it when it goes. Python must not close it as well:
        # by then the number may belong to another socket (seen as links failing with "Bad file descriptor").
        sock.detach()
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
