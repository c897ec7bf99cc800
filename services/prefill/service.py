"""The prefill worker: computes a prompt's KV into the decode worker's blocks and samples token 1."""

from __future__ import annotations

import asyncio
import contextlib
import logging


from glmserve.engine.async_engine import AsyncEngine
from glmserve.engine.kv_link import KVTransferError, LinkAddress, prometheus_observer
from glmserve.engine.kv_sender import KVLinkClient
from glmserve.engine.parallel.kv_plan import head_layout
from glmserve.engine.parallel.kv_setup import start_prefill_ranks
from glmserve.prefill.rank_links import RankLinkError, rank_transfer
from glmserve.metrics import ServiceMetrics
from glmserve.prefill.kv_streamer import KVStreamer, Transfer
from glmserve.prefill.prompt_mtp import PromptMTP
from glmserve.protos import worker_pb2 as pb
from glmserve.worker.mtp_hidden import hidden_to_bytes
from glmserve.protos import worker_pb2_grpc as pb_grpc
from glmserve.worker.convert import STATE_TO_PB, params_from_pb, token_logprob_to_pb
from glmserve.worker.config import WorkerConfig
from glmserve.worker.images_pb import mm_from_pb
from glmserve.worker.kv_device import kv_link_device
from glmserve.worker.lifecycle import Lifecycle
from glmserve.worker.load import load_report

log = logging.getLogger(__name__)


def _error(code: int, message: str, retriable: bool) -> pb.PrefillResponse:
    return pb.PrefillResponse(status=pb.Status(code=code, message=message, retriable=retriable))


class PrefillService(pb_grpc.PrefillWorkerServicer):
    def __init__(self, cfg: WorkerConfig, async_engine: AsyncEngine, metrics: ServiceMetrics, lifecycle: Lifecycle):
        self.cfg = cfg
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.links = KVLinkClient(kv_link_device(cfg.kv_transfer_backend, self.engine.device), timeout_s=cfg.kv_timeout, observer=prometheus_observer(metrics))
        # MTP speculative decoding: P samples one token and never drafts; it runs the MTP layer over the
        # prompt instead and sends that layer's KV and the last hidden state to D (prompt_mtp.py).
        self.mtp = self.engine.speculator is not None
        self.engine.speculator = None
        self.streamer = KVStreamer(self.engine.runner.kv_caches, PromptMTP(self.engine) if self.mtp else None)
        self.engine.step_observer = self.streamer
        self.engine.scheduler.send_guard = self.streamer  # blocks stay until their KV is sent
        # TP: every rank sends its own KV heads (engine/parallel/kv_setup.py); the step messages carry the plan.
        self.tp = cfg.engine.tensor_parallel_size
        self.splits_kv_heads = head_layout(self.engine.model_config, self.tp) is not None
        start_prefill_ranks(self.engine.runner, {"backend": cfg.kv_transfer_backend, "timeout_s": cfg.kv_timeout})
        if self.tp > 1:
            self.engine.runner.rank_plan = self.streamer.take_rank_plan

    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        if not self.lifecycle.accepting:
            return _error(pb.ERROR_CODE_UNAVAILABLE, "prefill worker is not serving", True)
        if request.block_size != self.engine.pool.block_size:
            return _error(pb.ERROR_CODE_INVALID_REQUEST,
                          f"block size {request.block_size} != this worker's {self.engine.pool.block_size}", False)
        try:
            params, eos = params_from_pb(request.sampling)
            mm = (mm_from_pb(list(request.token_ids), request.images, self.engine.model_config.vision)
                  if request.images else None)
        except ValueError as exc:
            return _error(pb.ERROR_CODE_INVALID_REQUEST, str(exc), False)
        if request.mtp and not self.mtp:
            # Not retriable: a deployment whose roles disagree is misconfigured; say so at once, on every request.
            return _error(pb.ERROR_CODE_PREFILL_FAILED, "the decode worker drafts with MTP but this prefill worker "
                          "was started without it: give prefill workers the same --speculative-algorithm mtp", False)
        if not request.kv_rank_links and self.splits_kv_heads:
            # The single link would carry rank 0's heads only: the decode worker planned for another size.
            return _error(pb.ERROR_CODE_KV_TRANSFER_FAILED, f"this prefill worker's {self.tp} ranks split the KV "
                          "heads: the decode worker must send kv_rank_links (it asks this worker's size again)", True)
        dst_cached = request.num_dst_cached_blocks * request.block_size
        if dst_cached >= len(request.token_ids):
            return _error(pb.ERROR_CODE_INVALID_REQUEST, f"the decode worker holds {dst_cached} of the "
                          f"{len(request.token_ids)} prompt tokens: at least one must be sent", False)
        params.max_tokens = 1  # only the first token is sampled here; decode does the rest
        rid = request.request_id
        self.lifecycle.begin()
        transfer = None
        try:
            if request.kv_rank_links:  # TP: one link per (prefill rank, decode rank) with its heads
                transfer = await asyncio.to_thread(rank_transfer, request, self.links, self.tp,
                                                   self.engine.runner.kv_caches[0], dst_cached)
            else:
                addr = LinkAddress(request.kv_link.host, request.kv_link.port, request.kv_link.link_id)
                sender = await asyncio.to_thread(self.links.sender, addr)
                transfer = Transfer(sender, request.transfer_id, sent_upto=dst_cached, mtp=request.mtp)
            self.streamer.register(rid, transfer)
            first, num_cached = None, 0
            stream = self.async_engine.generate(rid, list(request.token_ids), params, eos, mm=mm)
            async with contextlib.aclosing(stream):  # a cancelled call aborts the request at once
                async for out in stream:
                    if out.new_token_ids:
                        first = (out.new_token_ids[0], out.new_logprobs[0] if out.new_logprobs else None)
                    num_cached = out.num_cached_tokens
            if first is None:
                return _error(pb.ERROR_CODE_PREFILL_FAILED, "prefill produced no token", True)
            sent = 0
            for sender, _, _ in transfer.links():  # each of this rank's links (followers' are not awaited)
                sent += await asyncio.wait_for(asyncio.wrap_future(sender.finish(request.transfer_id)),
                                               self.cfg.kv_timeout) or 0
            resp = pb.PrefillResponse(request_id=rid, first_token_id=first[0], cached_tokens=num_cached,
                                      kv_bytes_sent=int(sent or 0),
                                      mrope_position_delta=mm.delta if mm is not None else 0)
            if first[1] is not None:
                resp.first_token_logprob.CopyFrom(token_logprob_to_pb(first[1]))
            if transfer.mtp:
                if transfer.last_hidden is None:
                    return _error(pb.ERROR_CODE_PREFILL_FAILED, "prefill kept no MTP hidden state", True)
                resp.mtp_hidden = hidden_to_bytes(transfer.last_hidden)
            transfer = None  # delivered
            return resp
        except RankLinkError as exc:  # the decode worker planned for another layout of this group
            return _error(pb.ERROR_CODE_KV_TRANSFER_FAILED, str(exc), True)
        except (KVTransferError, asyncio.TimeoutError, TimeoutError) as exc:
            return _error(pb.ERROR_CODE_KV_TRANSFER_FAILED, f"KV transfer failed: {exc}", True)
        except ValueError as exc:  # refused by the engine (too long, bad ids)
            return _error(pb.ERROR_CODE_INVALID_REQUEST, str(exc), False)
        finally:
            self.streamer.unregister(rid)
            if transfer is not None:  # cancelled or failed midway: tell D to drop what is in flight
                for sender, _, _ in transfer.links():
                    sender.cancel(transfer.transfer_id)
            self.lifecycle.end()

    async def Cancel(self, request: pb.CancelRequest, context) -> pb.CancelResponse:
        found = request.request_id in self.engine.requests
        self.async_engine.abort(request.request_id)
        return pb.CancelResponse(found=found)

    async def Health(self, request, context) -> pb.HealthResponse:
        return pb.HealthResponse(state=STATE_TO_PB[self.lifecycle.state])

    async def GetLoad(self, request: pb.LoadRequest, context) -> pb.LoadReport:
        report = await self.async_engine.call(lambda e: load_report(e, self.cfg, self.lifecycle, request))
        report.state = STATE_TO_PB[self.lifecycle.state]
        return report

