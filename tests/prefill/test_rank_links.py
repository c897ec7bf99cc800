"""A prefill request's TP links (PrefillRequest.kv_rank_links) become the leader's own targets and the
followers' plan; links this group cannot serve (a rank or a head it does not have) are refused."""

from __future__ import annotations

import pytest
import torch

from glmserve.prefill.rank_links import RankLinkError, rank_transfer
from glmserve.protos import worker_pb2 as pb


class _Links:
    """Stands in for KVLinkClient: records which decode endpoints rank 0 connects to."""

    def __init__(self):
        self.opened = []

    def sender(self, address):
        self.opened.append(address)
        return f"sender:{address.port}"


def _request(*links) -> pb.PrefillRequest:
    return pb.PrefillRequest(transfer_id=9, kv_rank_links=[
        pb.KvRankLink(src_rank=r, src_head=h, num_heads=n,
                      link=pb.KvLinkAddress(host="d", port=port, link_id=f"l{port}"))
        for r, h, n, port in links])


GQA_RANK = torch.zeros(4, 2, 16, 2, 8)  # a prefill rank's layer cache: 2 KV heads per rank


def test_rank_zero_sends_itself_and_the_followers_get_their_links():
    links = _Links()
    t = rank_transfer(_request((0, 0, 1, 1), (0, 1, 1, 2), (1, 0, 2, 3)), links, 2, GQA_RANK, 16)
    assert t.targets == [("sender:1", 0, 1), ("sender:2", 1, 1)] and t.sender == "sender:1"
    assert [a.port for a in links.opened] == [1, 2]  # only rank 0's links are opened here
    assert t.rank_links == {1: [("d", 3, "l3", 0, 2)]}
    assert (t.transfer_id, t.sent_upto) == (9, 16)


def test_only_followers_send():
    t = rank_transfer(_request((1, 0, 2, 3)), _Links(), 2, GQA_RANK, 0)
    assert t.targets == [] and t.links() == [] and t.rank_links == {1: [("d", 3, "l3", 0, 2)]}


@pytest.mark.parametrize("link, message", [((2, 0, 1, 1), "prefill rank 2; this prefill worker has 2 rank"),
                                           ((0, 1, 2, 1), "heads 1..2; each rank of this prefill worker holds 2")])
def test_links_this_group_cannot_serve_are_refused(link, message):
    with pytest.raises(RankLinkError, match=message):
        rank_transfer(_request(link), _Links(), 2, GQA_RANK, 0)
