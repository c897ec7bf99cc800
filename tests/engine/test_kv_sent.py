"""KVSender.sent(transfer): done only once nothing queued for the transfer still reads P's memory; a
cancel or a failed link completes it too (the prefill worker frees the request's blocks on it)."""

from __future__ import annotations

import torch

from glmserve.engine.kv_link import LinkAddress
from glmserve.engine.kv_receiver import KVLinkServer
from glmserve.engine.kv_sender import KVSender

CACHE = torch.randn(8, 2, 4, 2, 8)  # GQA layer cache: 8 blocks of 4 tokens


def _queue(sender: KVSender, tid: int) -> None:
    for layer in range(3):  # whole blocks 2..5, straight from the cache
        sender.send_layer(tid, layer, CACHE, [2, 3, 4, 5], 0, 16, copy=False)


def test_sent_waits_for_queued_payloads_and_a_cancel_or_a_failed_link_completes_it():
    server = KVLinkServer("127.0.0.1", 0)
    # The decode worker never joins these links: everything stays queued on P.
    waiting = KVSender(LinkAddress(server.host, server.port, "never-a"), connect_timeout_s=30)
    failing = KVSender(LinkAddress(server.host, server.port, "never-b"), connect_timeout_s=1.5)
    try:
        assert waiting.sent(7).done()  # nothing queued for it
        _queue(waiting, 7)
        _queue(waiting, 8)
        sent7, sent8 = waiting.sent(7), waiting.sent(8)
        assert not sent7.done() and not sent8.done()
        waiting.cancel(7)  # drops 7's payloads only
        assert sent7.result(1) is None and not sent8.done()

        _queue(failing, 1)
        sent1 = failing.sent(1)
        assert not sent1.done()
        assert sent1.result(10) is None and failing.broken  # the peer never joined: the link failed
        assert failing.sent(2).done()
    finally:
        waiting.close()  # its thread stops waiting for the peer and ends before the store goes
        failing.close()
        server.close()
