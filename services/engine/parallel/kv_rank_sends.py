"""A prefill follower's KV sends: its own KV heads, straight from its cache to the decode ranks that hold
them (kv_plan.py), as the leader's step message says. The leader's KV streamer decides what goes (which
requests, tokens, links); a follower only repeats it for its heads. Sends copy the tokens out before the
step ends (no send guard on followers: their blocks are reused as soon as the leader frees them)."""

from __future__ import annotations

from typing import Sequence

import torch

from glmserve.engine.kv_link import LinkAddress
from glmserve.engine.kv_sender import KVLinkClient
from glmserve.engine.parallel.kv_plan import head_view

# One plan item per request with KV to send this step: (transfer id, request id, decoder layers,
# {rank: [(host, port, link name, first head, head count)]}, prefix (start, count) or None, chunk
# (start, count) or None). The prefix (P's cached tokens) goes before the forward, the chunk layer by layer.
PlanItem = tuple[int, str, int, dict, tuple[int, int] | None, tuple[int, int] | None]


class RankSends:
    def __init__(self, client: KVLinkClient, kv_caches: Sequence[torch.Tensor], rank: int):
        self.client, self.kv_caches, self.rank = client, kv_caches, rank

    def before_step(self, plan: list[PlanItem], chunks):
        requests = {c.request.request_id: c.request for c in chunks}
        work = []
        for tid, rid, num_layers, links, prefix, chunk in plan:
            mine, req = links.get(self.rank), requests.get(rid)
            if not mine or req is None:
                continue
            targets = [(self.client.sender(LinkAddress(host, port, name)), head, n)
                       for host, port, name, head, n in mine]
            blocks = list(req.block_ids)
            if prefix is not None:
                for layer in range(num_layers):
                    self._send(tid, layer, targets, blocks, *prefix)
            if chunk is not None:
                work.append((tid, targets, blocks, chunk))
        if not work:
            return None

        def on_layer_done(layer: int) -> None:
            for tid, targets, blocks, (start, count) in work:
                self._send(tid, layer, targets, blocks, start, count)

        return on_layer_done

    def _send(self, tid: int, layer: int, targets, blocks: list[int], start: int, count: int) -> None:
        cache = self.kv_caches[layer]
        for sender, head, n in targets:
            sender.send_layer(tid, layer, head_view(cache, head, n), blocks, start, count)

    def close(self) -> None:
        self.client.close()
