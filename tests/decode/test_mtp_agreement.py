"""Prefill and decode workers must agree on MTP: a decode worker that drafts asks for the MTP layer's KV and
the last hidden state (PrefillRequest.mtp); a prefill worker started without MTP refuses such a request with
a message that says which flag to set, and a decode worker refuses a reply without a usable hidden state."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from glmserve.decode.service import DecodeService, RequestFailed
from glmserve.prefill.service import PrefillService
from glmserve.protos import worker_pb2 as pb
from glmserve.worker.mtp_hidden import hidden_from_bytes, hidden_to_bytes


def _prefill_service(mtp: bool) -> PrefillService:
    svc = PrefillService.__new__(PrefillService)  # only what Prefill reads before it touches the engine
    svc.lifecycle = SimpleNamespace(accepting=True)
    svc.engine = SimpleNamespace(pool=SimpleNamespace(block_size=16))
    svc.mtp = mtp
    return svc


def test_prefill_without_mtp_refuses_a_decode_worker_that_drafts():
    req = pb.PrefillRequest(request_id="r", token_ids=[1, 2, 3], block_size=16, mtp=True)
    resp = asyncio.run(_prefill_service(mtp=False).Prefill(req, None))
    assert resp.status.code == pb.ERROR_CODE_PREFILL_FAILED and not resp.status.retriable
    assert "--speculative-algorithm mtp" in resp.status.message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_state_round_trips_in_the_model_dtype(dtype):
    h = torch.randn(24).to(dtype)
    assert torch.equal(hidden_from_bytes(hidden_to_bytes(h), 24, dtype), h)


@pytest.mark.parametrize("data", [b"", b"\0" * 8])
def test_decode_refuses_a_reply_without_a_usable_hidden_state(data):
    svc = DecodeService.__new__(DecodeService)
    svc.engine = SimpleNamespace(model_config=SimpleNamespace(hidden_size=24), loaded=SimpleNamespace(dtype=torch.float32))
    with pytest.raises(RequestFailed, match="same model and --speculative-algorithm mtp"):
        svc._mtp_hidden(pb.PrefillResponse(mtp_hidden=data), "p:1")
