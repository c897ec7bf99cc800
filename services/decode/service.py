"""The decode worker: admits a request into KV blocks, has a prefill worker fill them over the KV
link, then generates the rest of the tokens in its continuous batch and streams them to the router.

A request's life here, as queues:
  engine.waiting (remote_prefill)   FIFO for a sequence slot and blocks; bounded (--max-waiting-requests),
                                    and by time (--admission-timeout): both refusals are retriable
  engine.waiting_for_kv             blocks held (this worker's cached prefix reused); P prefills and sends
                                    only the tokens past that prefix, layer by layer, into them
  engine.running                    KV and first token arrived: decoded in the continuous batch
Leaving at any point (client gone, cancel, error) aborts the request in the engine, which frees exactly
its blocks, after cancelling a transfer still writing into them (kv_connector.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

import grpc

from glmserve.decode.kv_connector import DecodeKVConnector
from glmserve.engine.async_engine import AsyncEngine, KVAllocated
from glmserve.engine.engine import EngineBusy, RequestError
from glmserve.engine.kv_link import KVTransferError, prometheus_observer
from glmserve.engine.kv_receiver import KVLinkServer
from glmserve.engine.parallel.kv_plan import is_plain, rank_links
from glmserve.engine.parallel.kv_ranks import Expect, RankKVEndpoint
from glmserve.engine.parallel.kv_setup import start_decode_ranks
from glmserve.metrics import ServiceMetrics
from glmserve.protos import worker_pb2 as pb
from glmserve.protos import worker_pb2_grpc as pb_grpc
from glmserve.worker.convert import STATE_TO_PB, FINISH_TO_PB, params_from_pb, sampled_from_pb, token_logprob_to_pb
from glmserve.worker.config import WorkerConfig
from glmserve.worker.kv_device import kv_link_device
from glmserve.worker.grpc_options import insecure_channel
from glmserve.worker.images_pb import mm_from_pb
from glmserve.worker.lifecycle import Lifecycle
from glmserve.worker.mtp_hidden import hidden_from_bytes
from glmserve.worker.load import load_report

log = logging.getLogger(__name__)


class RequestFailed(Exception):
    def __init__(self, code: int, message: str, retriable: bool):
        super().__init__(message)
        self.code, self.message, self.retriable = code, message, retriable

    def chunk(self, request_id: str) -> pb.TokenChunk:
        return pb.TokenChunk(request_id=request_id, finish_reason=pb.FINISH_REASON_ERROR,
                             status=pb.Status(code=self.code, message=self.message, retriable=self.retriable))


class DecodeService(pb_grpc.DecodeWorkerServicer):
    def __init__(self, cfg: WorkerConfig, async_engine: AsyncEngine, metrics: ServiceMetrics, lifecycle: Lifecycle):
        self.cfg = cfg
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.metrics = metrics
        self.lifecycle = lifecycle
        link_host = cfg.host if cfg.host not in ("localhost",) else "127.0.0.1"
        self.link_server = KVLinkServer(link_host, cfg.kv_port,
                                        kv_link_device(cfg.kv_transfer_backend, self.engine.device), timeout_s=cfg.kv_timeout,
                                        observer=prometheus_observer(metrics))
        # TP (either group): every decode rank receives its own KV heads (engine/parallel/kv_ranks.py).
        self.tp = cfg.engine.tensor_parallel_size
        self.ranks = start_decode_ranks(
            self.engine.runner, RankKVEndpoint(self.link_server, self.engine.runner.kv_caches, 0, cfg.advertise_host),
            {"bind_host": link_host, "advertise_host": cfg.advertise_host, "backend": cfg.kv_transfer_backend,
             "timeout_s": cfg.kv_timeout}, prometheus_observer(metrics))
        self._prefill_tp: dict[str, int] = {}  # prefill address -> its group's size (its LoadReport)
        self.connector = DecodeKVConnector(async_engine.deliver)
        self.engine.scheduler.kv_connector = self.connector
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._prefill_of: dict[str, str] = {}  # request id -> prefill address, while prefilling

    def _prefill_stub(self, address: str) -> pb_grpc.PrefillWorkerStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = insecure_channel(address)
        return pb_grpc.PrefillWorkerStub(ch)

    # -- Generate --------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.TokenChunk]:
        rid = request.request_id
        if not self.lifecycle.accepting:
            yield RequestFailed(pb.ERROR_CODE_UNAVAILABLE, "decode worker is draining", True).chunk(rid)
            return
        self.lifecycle.begin()
        try:
            async for chunk in self._generate(request):
                yield chunk
        except RequestFailed as exc:
            yield exc.chunk(rid)
        finally:
            self.lifecycle.end()

    def _validate(self, request: pb.GenerateRequest):
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise RequestFailed(pb.ERROR_CODE_INVALID_REQUEST, "empty prompt", False)
        if len(prompt) >= self.engine.max_model_len:
            raise RequestFailed(pb.ERROR_CODE_PROMPT_TOO_LONG,
                                f"prompt of {len(prompt)} tokens does not fit max_model_len {self.engine.max_model_len}",
                                False)
        vocab = self.engine.model_config.vocab_size
        if any(t >= vocab for t in prompt):
            raise RequestFailed(pb.ERROR_CODE_INVALID_REQUEST, f"token ids must be < {vocab}", False)
        try:
            params, eos = params_from_pb(request.sampling)
            mm = mm_from_pb(prompt, request.images, self.engine.model_config.vision) if request.images else None
        except ValueError as exc:
            raise RequestFailed(pb.ERROR_CODE_INVALID_REQUEST, str(exc), False) from exc
        return prompt, params, eos, mm

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.TokenChunk]:
        rid = request.request_id
        prompt, params, eos, mm = self._validate(request)
        stream = self.async_engine.generate_remote(rid, prompt, params, eos, max_waiting=self.cfg.max_waiting_requests,
                                                   mm=mm)
        # aclosing: however this generator ends, the stream ends too, which aborts the request in the
        # engine (freeing its blocks, after cancelling any transfer into them).
        async with contextlib.aclosing(stream):
            allocated = await self._admitted(stream, len(prompt))
            first, cached, mtp_hidden = await self._prefill(request, prompt, allocated,
                                                            mm.delta if mm is not None else 0)
            self.async_engine.remote_kv_arrived(rid, first, cached, mtp_hidden)
            first_chunk = True
            async for out in stream:
                chunk = pb.TokenChunk(request_id=rid, token_ids=out.new_token_ids,
                                      logprobs=[token_logprob_to_pb(t) for t in out.new_logprobs])
                if first_chunk:
                    chunk.prompt_tokens, chunk.cached_prompt_tokens = len(prompt), cached
                    first_chunk = False
                if out.finished:
                    chunk.finish_reason = FINISH_TO_PB.get(out.finish_reason, pb.FINISH_REASON_STOP)
                    if isinstance(out.stop_reason, int):
                        chunk.stop_token_id = out.stop_reason
                yield chunk

    async def _admitted(self, stream, num_tokens: int) -> KVAllocated:
        """Wait for the engine to give the request its blocks: bounded queue, bounded time."""
        try:
            async with asyncio.timeout(self.cfg.admission_timeout):
                item = await anext(stream)
        except TimeoutError:
            raise RequestFailed(pb.ERROR_CODE_NO_KV_CAPACITY, f"no KV capacity for {num_tokens} tokens within "
                                f"{self.cfg.admission_timeout:.0f}s", True) from None
        except EngineBusy as exc:
            raise RequestFailed(pb.ERROR_CODE_NO_KV_CAPACITY, f"decode worker {exc}", True) from None
        except RequestError as exc:
            raise RequestFailed(pb.ERROR_CODE_INVALID_REQUEST, str(exc), False) from None
        if not isinstance(item, KVAllocated):  # aborted while it waited
            raise RequestFailed(pb.ERROR_CODE_CANCELLED, "cancelled before admission", False)
        return item

    async def _prefill(self, request: pb.GenerateRequest, prompt: list[int], allocated: KVAllocated,
                       mrope_delta: int = 0):
        """Have the prefill worker fill the blocks past D's cached prefix; returns (first token, P's
        prefix-cached tokens, the MTP hidden state or None). mrope_delta: this worker's M-RoPE offset, which
        P's must equal."""
        rid, address = request.request_id, request.prefill_address
        blocks, local = allocated.block_ids, allocated.num_local_cached_tokens
        mtp = self.engine.speculator is not None  # P also sends the MTP layer's KV (one more layer)
        num_layers = self.engine.model_config.num_hidden_layers + mtp
        links = rank_links(self.engine.model_config, await self._prefill_size(address), self.tp)
        block_size = self.engine.pool.block_size
        preq = pb.PrefillRequest(request_id=rid, token_ids=prompt, sampling=request.sampling,
                                 dst_block_ids=blocks, block_size=block_size,
                                 num_dst_cached_blocks=local // block_size, mtp=mtp, images=request.images)
        if is_plain(links):  # rank 0's whole cache to this one: the single-process link
            rx = self.link_server.receiver(address)
            tid = rx.new_transfer_id()
            handle = self.connector.start_transfer(
                rid, lambda: rx.expect(tid, self.engine.runner.kv_caches, blocks, len(prompt), num_layers,
                                       first_token=local))
            preq.kv_link.CopyFrom(pb.KvLinkAddress(host=self.cfg.advertise_host, port=self.link_server.port,
                                                   link_id=rx.address.name))
        else:
            tid = self.ranks.new_transfer_id()
            try:
                handle, rank_pb = await asyncio.to_thread(self._expect_ranks, rid, address, links, tid, blocks,
                                                          len(prompt), num_layers, local)
            except KVTransferError as exc:
                raise RequestFailed(pb.ERROR_CODE_KV_TRANSFER_FAILED, f"KV links to this group: {exc}", True) from exc
            preq.kv_rank_links.extend(rank_pb)
        preq.transfer_id = tid
        want_logprobs = request.sampling.HasField("logprobs")
        self._prefill_of[rid] = address
        done = False
        stale = True  # a failure asks the prefill worker's size again (it may have restarted with another)
        try:
            resp = await self._prefill_stub(address).Prefill(preq, timeout=self.cfg.prefill_timeout)
            if resp.status.code != pb.ERROR_CODE_OK:
                stale = resp.status.code == pb.ERROR_CODE_KV_TRANSFER_FAILED
                raise RequestFailed(resp.status.code, f"prefill {address}: {resp.status.message}", resp.status.retriable)
            if resp.mrope_position_delta != mrope_delta:  # P laid the images out otherwise: its KV is not ours
                stale = False
                raise RequestFailed(pb.ERROR_CODE_INTERNAL, f"prefill {address} placed the images at M-RoPE offset "
                                    f"{resp.mrope_position_delta}, this worker at {mrope_delta}", False)
            await asyncio.wait_for(asyncio.wrap_future(handle.future), self.cfg.kv_timeout)
            hidden = self._mtp_hidden(resp, address) if mtp else None
            done = True
            self.metrics.get("kv_transfer_reused_tokens").inc(local)
            return (sampled_from_pb(resp.first_token_id, resp.first_token_logprob, want_logprobs), resp.cached_tokens,
                    hidden)
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(pb.ERROR_CODE_PREFILL_FAILED, f"prefill worker {address}: {exc.code().name} "
                                f"{exc.details()}", True) from exc
        except (KVTransferError, TimeoutError, asyncio.TimeoutError) as exc:
            raise RequestFailed(pb.ERROR_CODE_KV_TRANSFER_FAILED, f"KV transfer from {address} failed: {exc!r}",
                                True) from exc
        except (asyncio.CancelledError, GeneratorExit):
            stale = False  # the client left: nothing wrong with the prefill worker
            raise
        finally:
            self._prefill_of.pop(rid, None)
            try:
                if not done:
                    if stale:
                        self._prefill_tp.pop(address, None)
                    asyncio.ensure_future(self._cancel_prefill(address, rid))
                    # Nothing more lands in these blocks once this returns. On a TP group that takes a control
                    # round; the connector keeps the handle meanwhile, so freeing the blocks waits for it too.
                    if preq.kv_rank_links:
                        await asyncio.to_thread(handle.cancel)
                    else:
                        handle.cancel()
            finally:
                self.connector.transfer_done(rid)

    def _expect_ranks(self, rid: str, address: str, links, tid: int, blocks: list[int], num_tokens: int,
                      num_layers: int, local: int):
        """Register the transfer on every decode rank (worker thread: a control round); returns the handle
        and the PrefillRequest's links."""
        by_dst: dict[int, list] = {}
        for ln in links:
            by_dst.setdefault(ln.dst_rank, []).append(ln)
        expects = {d: Expect(tid, address, [(ln.src_rank, ln.dst_head, ln.num_heads) for ln in mine], list(blocks),
                             num_tokens, num_layers, local) for d, mine in sorted(by_dst.items())}
        addresses: dict = {}

        def expect():
            t, addresses_by_rank = self.ranks.expect(expects)
            addresses.update(addresses_by_rank)
            return t

        handle = self.connector.start_transfer(rid, expect)
        out = []
        for d in expects:
            for ln, addr in zip(by_dst[d], addresses[d]):
                out.append(pb.KvRankLink(src_rank=ln.src_rank, src_head=ln.src_head, num_heads=ln.num_heads,
                                         link=pb.KvLinkAddress(host=addr.host, port=addr.port, link_id=addr.name)))
        return handle, out

    async def _prefill_size(self, address: str) -> int:
        """The prefill group's size, from its LoadReport (asked once per address; again after a failure).
        The MLA latent is whole on every rank: the size does not matter then."""
        if self.engine.model_config.is_mla:
            return 1
        size = self._prefill_tp.get(address)
        if size is None:
            try:
                report = await self._prefill_stub(address).GetLoad(pb.LoadRequest(), timeout=self.cfg.prefill_timeout)
            except grpc.aio.AioRpcError as exc:
                raise RequestFailed(pb.ERROR_CODE_PREFILL_FAILED, f"prefill worker {address}: {exc.code().name} "
                                    f"{exc.details()}", True) from exc
            size = self._prefill_tp[address] = max(1, report.tensor_parallel_size)
        return size

    def close(self) -> None:
        """Stop the ranks' KV control and the link servers (before the group itself stops)."""
        self.ranks.close()

    def _mtp_hidden(self, resp: pb.PrefillResponse, address: str):
        try:
            return hidden_from_bytes(resp.mtp_hidden, self.engine.model_config.hidden_size, self.engine.loaded.dtype)
        except ValueError as exc:
            raise RequestFailed(pb.ERROR_CODE_PREFILL_FAILED, f"prefill {address}: {exc}; prefill and decode workers "
                                "need the same model and --speculative-algorithm mtp", False) from None

    async def _cancel_prefill(self, address: str, rid: str) -> None:
        try:
            await self._prefill_stub(address).Cancel(pb.CancelRequest(request_id=rid), timeout=5)
        except grpc.aio.AioRpcError:
            pass

    # -- other RPCs ----------------------------------------------------------------------------
    async def Cancel(self, request: pb.CancelRequest, context) -> pb.CancelResponse:
        rid = request.request_id
        address = self._prefill_of.get(rid)
        if address is not None:
            await self._cancel_prefill(address, rid)
        found = rid in self.engine.requests or address is not None
        self.async_engine.abort(rid)
        return pb.CancelResponse(found=found)

    async def Health(self, request, context) -> pb.HealthResponse:
        return pb.HealthResponse(state=STATE_TO_PB[self.lifecycle.state])

    async def GetLoad(self, request: pb.LoadRequest, context) -> pb.LoadReport:
        report = await self.async_engine.call(lambda e: load_report(e, self.cfg, self.lifecycle, request))
        report.state = STATE_TO_PB[self.lifecycle.state]
        return report

