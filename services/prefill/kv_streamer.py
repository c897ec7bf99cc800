"""Streams each prefill step's new KV to the decode workers, layer by layer, while later layers compute.

The prefill worker's side of the KV connector. Runs on the engine thread as the engine's step observer:
for every scheduled chunk of a request that has a transfer, it sends (once) the prefix-cache hits P did
not compute, then, from the model's per-layer hook, the chunk's new tokens of that layer. Tokens the
decode worker already holds (its own prefix cache) and tokens already sent are never sent (a preempted
request is recomputed, but D must receive each (layer, token) exactly once).

With MTP speculative decoding (`prompt_mtp`), a transfer that asks for it also gets the MTP layer's KV,
sent once the MTP pass after sampling has written it, and keeps the target's last hidden state.

Whole blocks go out straight from P's paged cache (no staging copy competing with the link for P's
cores). As the scheduler's send guard it keeps a request's blocks allocated after the request lets go
of them (finished, aborted, preempted) until the link has sent everything queued from them.

On a TP group (kv_plan.py) a transfer may have several links: this rank sends its heads to each decode
rank of `targets`, and each step's `rank_plan` tells the followers what they send of theirs.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from glmserve.engine.kv_transport import KVSendPort
from glmserve.engine.parallel.kv_plan import head_view


@dataclass
class Transfer:
    sender: KVSendPort
    transfer_id: int
    sent_upto: int = 0  # tokens [0, sent_upto) of every layer are on their way, or already at D
    prefix_tokens: int = 0  # prefix-cache hit tokens sent from P's cache without recompute
    mtp: bool = False  # D drafts with MTP: send the MTP KV layer too, and keep the last hidden state
    last_hidden: torch.Tensor | None = None  # [hidden_size] at the last prompt position (mtp only)
    # TP links: this rank's (sender, first head, head count; 0 = whole cache) links, instead of `sender`
    # alone, and the followers' {rank: [(host, port, link name, first head, count)]} (kv_rank_sends.py).
    targets: list[tuple[KVSendPort, int, int]] | None = None
    rank_links: dict | None = None

    def links(self) -> list[tuple[KVSendPort, int, int]]:
        return self.targets if self.targets is not None else [(self.sender, 0, 0)]


class KVStreamer:
    def __init__(self, kv_caches, prompt_mtp=None):
        """With prompt_mtp, the last of kv_caches is the MTP layer's, sent only to transfers that ask for it."""
        self.kv_caches = kv_caches
        self.num_layers = prompt_mtp.layer if prompt_mtp is not None else len(kv_caches)  # the decoder's layers
        self.prompt_mtp = prompt_mtp
        if prompt_mtp is not None:
            self.after_sample = self._after_sample  # the engine passes hidden states to observers that have it
        self._step: list[tuple] = []  # this step's (request, start, count, transfer, first unsent, count unsent)
        self._lock = threading.Lock()
        self._transfers: dict[str, Transfer] = {}
        # Requests whose blocks have sends queued since they last let go of their blocks -> the link.
        # Kept apart from _transfers: the prefill call may unregister before the engine frees the blocks.
        self._sending: dict[str, list[tuple[KVSendPort, int]]] = {}
        self._plan: list = []  # this step's sends for the TP followers (take_rank_plan)

    def register(self, request_id: str, transfer: Transfer) -> None:
        with self._lock:
            self._transfers[request_id] = transfer

    def unregister(self, request_id: str) -> Transfer | None:
        with self._lock:
            return self._transfers.pop(request_id, None)

    # -- engine-thread observer API ------------------------------------------------------------
    def before_forward(self, chunks):
        work = []
        self._step = []
        self._plan = []
        with self._lock:
            for c in chunks:
                req = c.request
                start = req.num_computed_tokens
                t = self._transfers.get(req.request_id)
                if t is None:
                    self._step.append((req, start, c.num_new_tokens, None, 0, 0))
                    continue
                prefix = None
                if start > t.sent_upto:  # cached prefix: P holds it but does not recompute it
                    prefix = (t.sent_upto, start - t.sent_upto)
                    self._sending[req.request_id] = [(s, t.transfer_id) for s, _, _ in t.links()]
                    for layer, cache in enumerate(self.kv_caches[: self.num_layers + t.mtp]):
                        for sender, head, n in t.links():
                            sender.send_layer(t.transfer_id, layer, head_view(cache, head, n), req.block_ids,
                                              t.sent_upto, start - t.sent_upto, copy=False)
                    t.prefix_tokens = max(t.prefix_tokens, start)
                    t.sent_upto = start
                end = start + c.num_new_tokens
                first, count = t.sent_upto, max(0, end - t.sent_upto)
                self._step.append((req, start, c.num_new_tokens, t, first, count))
                if count:
                    self._sending[req.request_id] = [(s, t.transfer_id) for s, _, _ in t.links()]
                    work.append((t, list(req.block_ids), first, count))
                    t.sent_upto = end
                if t.rank_links and (prefix or count):
                    self._plan.append((t.transfer_id, req.request_id, self.num_layers, t.rank_links, prefix,
                                       (first, count) if count else None))
        if not work:
            return None

        def on_layer_done(layer: int) -> None:
            for t, block_ids, first, count in work:
                for sender, head, n in t.links():
                    sender.send_layer(t.transfer_id, layer, head_view(self.kv_caches[layer], head, n), block_ids,
                                      first, count, copy=False)

        return on_layer_done

    def take_rank_plan(self) -> list:
        """What the TP followers send from the step about to run (the leader's step message carries it)."""
        plan, self._plan = self._plan, []
        return plan

    def _after_sample(self, hidden: torch.Tensor, sampled: dict[str, int]) -> None:
        """Engine thread, after sampling: run the MTP layer over the step's positions (P's own cache
        always gets the MTP KV, so its prefix cache stays whole), then send what MTP transfers need."""
        steps, self._step = self._step, []
        if not steps:
            return
        self.prompt_mtp.run([(r, s, n) for r, s, n, _, _, _ in steps], hidden, sampled)
        mtp_cache = self.kv_caches[self.num_layers]
        off = 0
        for req, start, n, t, first, count in steps:
            off += n
            if t is None or not t.mtp:
                continue
            if count:
                t.sender.send_layer(t.transfer_id, self.num_layers, mtp_cache, req.block_ids, first, count)
            if req.request_id in sampled:
                t.last_hidden = hidden[off - 1].detach().to("cpu", copy=True)

    # -- the scheduler's send guard (engine thread) ---------------------------------------------
    def blocks_released(self, req) -> Future | None:
        with self._lock:
            sending = self._sending.pop(req.request_id, None)
        if sending is None:
            return None
        if len(sending) == 1:
            return sending[0][0].sent(sending[0][1])
        return all_done([sender.sent(tid) for sender, tid in sending])


def all_done(futures: list[Future]) -> Future:
    """A future done once every one of these is (their results ignored)."""
    out: Future = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def one(_):
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            out.set_result(None)

    if not futures:
        out.set_result(None)
    for f in futures:
        f.add_done_callback(one)
    return out
