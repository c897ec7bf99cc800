"""Streams each prefill step's new KV to the decode workers, layer by layer, while later layers compute.

The prefill worker's side of the KV connector. Runs on the engine thread as the engine's step observer:
for every scheduled chunk of a request that has a transfer, it sends (once) the prefix-cache hits P did
not compute, then, from the model's per-layer hook, the chunk's new tokens of that layer. Tokens the
decode worker already holds (its own prefix cache) and tokens already sent are never sent (a preempted
request is recomputed, but D must receive each (layer, token) exactly once).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from glmserve.engine.kv_transport import KVSendPort


@dataclass
class Transfer:
    sender: KVSendPort
    transfer_id: int
    sent_upto: int = 0  # tokens [0, sent_upto) of every layer are on their way, or already at D
    prefix_tokens: int = 0  # prefix-cache hit tokens sent from P's cache without recompute


class KVStreamer:
    def __init__(self, kv_caches):
        self.kv_caches = kv_caches
        self._lock = threading.Lock()
        self._transfers: dict[str, Transfer] = {}

    def register(self, request_id: str, transfer: Transfer) -> None:
        with self._lock:
            self._transfers[request_id] = transfer

    def unregister(self, request_id: str) -> Transfer | None:
        with self._lock:
            return self._transfers.pop(request_id, None)

    # -- engine-thread observer API ------------------------------------------------------------
    def before_forward(self, chunks):
        work = []
        with self._lock:
            for c in chunks:
                req = c.request
                t = self._transfers.get(req.request_id)
                if t is None:
                    continue
                start = req.num_computed_tokens
                if start > t.sent_upto:  # cached prefix: P holds it but does not recompute it
                    for layer, cache in enumerate(self.kv_caches):
                        t.sender.send_layer(t.transfer_id, layer, cache, req.block_ids, t.sent_upto,
                                            start - t.sent_upto)
                    t.prefix_tokens = max(t.prefix_tokens, start)
                    t.sent_upto = start
                end = start + c.num_new_tokens
                if end > t.sent_upto:
                    work.append((t, list(req.block_ids), t.sent_upto, end - t.sent_upto))
                    t.sent_upto = end
        if not work:
            return None

        def on_layer_done(layer: int) -> None:
            for t, block_ids, first, count in work:
                t.sender.send_layer(t.transfer_id, layer, self.kv_caches[layer], block_ids, first, count)

        return on_layer_done
