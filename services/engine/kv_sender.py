"""The prefill side of the KV link (P): `KVLinkClient.sender(address)` joins the link the decode worker
named; the prefill worker calls `send_layer` (from ForwardContext.on_layer_done) and `finish`. By default
each call copies the tokens out of P's cache before returning, so later steps may overwrite those slots
(whole blocks are copied as blocks, one memcpy per run of consecutive blocks); with copy=False whole
blocks go straight from the cache, one message per run of consecutive blocks, and the caller keeps the
blocks until `sent(transfer_id)` resolves. One thread per link sends in order."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from math import prod
from typing import Sequence

import torch

from glmserve.engine.kv_link import (
    P_RANK, Channel, KVLinkError, Sending, LinkAddress, LinkEvent, LinkObserver, connect_host,
    local_address_towards, notify, BlockIds, resolve_future, side_stream, client_store,
)
from glmserve.engine.kv_wire import (
    CANCEL, CLOSE, DONE, HEARTBEAT, KV, Header, block_size_of, consecutive_runs, consecutive_start, gather_tokens,
    split_at_blocks, token_shape, token_slots,
)

log = logging.getLogger(__name__)

# copy=False sends a run of consecutive blocks as its own message when runs average at least this many
# bytes; scattered small blocks are gathered into one message (a message costs more than a small copy).
DIRECT_RUN_BYTES = 256 << 10


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
        self._in_flight: deque[tuple[Sending, _Msg]] = deque()  # posted, not yet confirmed (sender thread)
        self._pending: dict[int, int] = {}  # transfer -> payloads queued or in flight
        self._sent_waiters: dict[int, list[Future]] = {}  # transfer -> sent() futures
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
                   start: int, count: int, *, copy: bool = True) -> None:
        """Queue tokens start..start+count-1 of one layer. With copy (the default) they are copied out
        before this returns, so the caller may reuse their blocks at once. copy=False sends runs of
        consecutive whole blocks straight from the cache (no staging copy on P's cores): the caller must
        leave those blocks untouched until a later sent(transfer_id) future is done."""
        if count <= 0 or self._dropped(transfer_id):
            return
        cache = kv_cache_of_layer
        bs = block_size_of(cache)
        ids = torch.as_tensor(block_ids, dtype=torch.int64)
        if -(-(start + count) // bs) > ids.numel():
            raise ValueError(f"tokens {start}..{start + count} do not fit in {ids.numel()} blocks of {bs}")
        for first, n, whole in split_at_blocks(start, count, bs) if cache.is_contiguous() else [(start, count, False)]:
            if whole:
                self._send_blocks(transfer_id, layer, cache, ids[first // bs : (first + n) // bs], first, copy)
            else:
                self._send_tokens(transfer_id, layer, cache, ids, first, n)

    def _send_tokens(self, transfer_id: int, layer: int, cache: torch.Tensor, ids: torch.Tensor,
                     start: int, count: int) -> None:
        blk, off = token_slots(ids, block_size_of(cache), start, count, cache.device)
        nbytes = count * prod(token_shape(cache)) * cache.element_size()
        buf = self._buffer(nbytes, cache.device)
        payload = gather_tokens(cache, blk, off, out=buf[:nbytes].view(cache.dtype))
        self._queue_payload(Header(KV, transfer_id, layer, start, count, payload.numel(), payload.dtype), payload, buf)

    def _send_blocks(self, transfer_id: int, layer: int, cache: torch.Tensor, ids: torch.Tensor, start: int,
                     copy: bool) -> None:
        bs, n = block_size_of(cache), ids.numel()
        nbytes = n * cache[0].numel() * cache.element_size()
        if not copy:
            runs = consecutive_runs(ids)
            if len(runs) == 1 or nbytes // len(runs) >= DIRECT_RUN_BYTES:
                for at, first, length in runs:  # views: sent from the cache itself, page-granular
                    payload = cache[first : first + length]
                    self._queue_payload(Header(KV, transfer_id, layer, start + at * bs, length * bs, payload.numel(),
                                               payload.dtype, block_size=bs), payload, None)
                return
        run = consecutive_start(ids)
        buf = self._buffer(nbytes, cache.device)
        payload = buf[:nbytes].view(cache.dtype).view(n, *cache.shape[1:])
        if run is not None:
            payload.copy_(cache[run : run + n])  # one contiguous copy
        else:
            torch.index_select(cache, 0, ids.to(cache.device), out=payload)  # whole-block rows
        header = Header(KV, transfer_id, layer, start, n * bs, payload.numel(), payload.dtype, block_size=bs)
        self._queue_payload(header, payload, buf)

    def _queue_payload(self, header: Header, payload: torch.Tensor, buf: torch.Tensor | None) -> None:
        ready = None
        if payload.is_cuda:  # the sender thread waits for this copy only, not for the rest of the step
            ready = torch.cuda.Event()
            ready.record()
        if not self._put(_Msg(header, payload, ready, buf)):
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

    def sent(self, transfer_id: int) -> Future:
        """Future done (result None) once no payload queued so far for the transfer is still read from
        P's memory: each is sent, dropped by cancel(), or given up with a failed link. Until then blocks
        sent with copy=False must stay untouched."""
        fut: Future = Future()
        with self._cv:
            if self._pending.get(transfer_id, 0) == 0:
                fut.set_result(None)
            else:
                self._sent_waiters.setdefault(transfer_id, []).append(fut)
        return fut

    def _unpend(self, transfer_id: int, n: int = 1) -> list[Future]:
        """(Under the lock) n payloads of the transfer let go of P's memory; the waiters now done."""
        left = self._pending.get(transfer_id, 0) - n
        if left > 0:
            self._pending[transfer_id] = left
            return []
        self._pending.pop(transfer_id, None)
        return self._sent_waiters.pop(transfer_id, [])

    def cancel(self, transfer_id: int) -> None:
        """Drop what is still queued for the transfer and tell D; later send_* calls for it are ignored."""
        with self._cv:
            if transfer_id in self._cancelled:
                return
            self._cancelled[transfer_id] = None
            while len(self._cancelled) > 4096:  # only late calls of recent transfers need catching
                self._cancelled.popitem(last=False)
            dropped = sum(1 for m in self._queue if m.header.transfer_id == transfer_id and m.payload is not None)
            self._queue = deque(m for m in self._queue if m.header.transfer_id != transfer_id)
            self._queued_bytes = sum(m.header.nbytes for m in self._queue)
            done = self._unpend(transfer_id, dropped) if dropped else []
            out = self._open.pop(transfer_id, None)
            if self.error is None:
                self._queue.append(_Msg(Header(CANCEL, transfer_id)))
            self._cv.notify_all()
        if out is not None and out.future is not None:
            out.future.cancel()
        for fut in done:
            resolve_future(fut, None)

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
            self._pending[tid] = self._pending.get(tid, 0) + 1
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
            with side_stream(self.device):
                self._serve()
        except Exception as e:  # noqa: BLE001 - any failure of the link ends it
            for sending, _ in self._in_flight:  # gloo lets go of the payloads (fails fast on a broken link)
                try:
                    sending.wait()
                except Exception:  # noqa: BLE001
                    pass
            self._fail(e)
        else:
            self._fail(KVLinkError(f"KV link {self.address} closed"), quiet=True)

    def _serve(self) -> None:
        store = client_store(self.address, self._connect_timeout_s)
        gloo_host = local_address_towards(connect_host(self.address.host), self.address.port)
        ch = Channel(store, self.address.name, P_RANK, self.device, self._timeout_s, gloo_host,
                     self._connect_timeout_s, stop=lambda: self._closing)
        self.backend = ch.backend
        beat = self._heartbeat_s or min(self._timeout_s, ch.peer_info["timeout_s"]) / 4
        # Two messages in flight: the next one is posted before the last one is confirmed, so D never
        # waits for this thread to wake up between messages.
        in_flight = self._in_flight
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
                done = self._unpend(h.transfer_id)
            for fut in done:
                resolve_future(fut, None)
            notify(self._observer, LinkEvent(self.label, "bytes", "send", h.nbytes))
        if h.kind == DONE:
            with self._cv:
                out = self._open.pop(h.transfer_id, None)
            if out is not None:
                notify(self._observer, LinkEvent(self.label, "latency", "send", time.monotonic() - out.started))
                resolve_future(msg.future, out.bytes)

    def _fail(self, e: Exception, quiet: bool = False) -> None:
        err = e if isinstance(e, KVLinkError) else KVLinkError(f"KV link {self.address} broke: {e}")
        with self._cv:
            self.error = err
            failed = list(self._open.values())
            waiters = [f for futs in self._sent_waiters.values() for f in futs]
            self._sent_waiters.clear()
            self._pending.clear()
            self._open.clear()
            self._queue.clear()
            self._queued_bytes = 0
            self._pool.clear()
            self._cv.notify_all()
        for fut in waiters:  # nothing queued will be sent: the blocks are free to go
            resolve_future(fut, None)
        if not quiet or failed:
            log.warning("%s (%d transfers failed)", err, len(failed))
        for out in failed:
            if out.future is not None:
                resolve_future(out.future, exc=err)
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
