"""Starting every rank's KV link endpoint on a TP worker, from the leader's one `kv_setup` message.

Decode: each rank runs a KV link server into its own cache and answers the leader's control rounds
(kv_ranks.py) on a gloo group made for them. Prefill: each rank gets a link client to send its heads
(kv_rank_sends.py). The leader calls `start_decode_ranks` / `start_prefill_ranks` once, at service start.
"""

from __future__ import annotations

import logging
import threading

import torch.distributed as dist

from glmserve.engine.kv_link import LinkObserver, kv_link_device, local_address_towards
from glmserve.engine.kv_receiver import KVLinkServer
from glmserve.engine.kv_sender import KVLinkClient
from glmserve.engine.parallel.kv_rank_sends import RankSends
from glmserve.engine.parallel.kv_ranks import EventBuffer, KVRankGroup, RankKVEndpoint, follower_control

log = logging.getLogger(__name__)


def start_decode_ranks(runner, local: RankKVEndpoint, setup: dict, observer: LinkObserver | None) -> KVRankGroup:
    """setup: bind_host, advertise_host, backend, timeout_s. `runner` is the leader's (LeaderRunner) or a
    single rank's; `local` the leader's own endpoint."""
    st = getattr(runner, "st", None)
    if st is None or st.size == 1:
        return KVRankGroup(local, observer=observer)
    group = runner.kv_setup({"role": "decode", **setup}, then=lambda: dist.new_group(backend="gloo"))

    def broken(reason: str) -> None:  # as a failed step: the rank group ends the worker (rank_group.attach)
        if runner.on_broken is not None:
            runner.on_broken(reason)

    return KVRankGroup(local, st.size, group, observer, on_broken=broken)


def start_prefill_ranks(runner, setup: dict) -> None:
    """setup: backend, timeout_s. The followers send what the leader's step messages plan from then on."""
    if getattr(runner, "st", None) is not None and runner.st.size > 1:
        runner.kv_setup({"role": "prefill", **setup})


class FollowerKV:
    """A follower's KV link side (none until the leader's kv_setup)."""

    def __init__(self, runner, st, node):
        self.runner, self.st, self.node = runner, st, node
        self.sends: RankSends | None = None
        self.endpoint: RankKVEndpoint | None = None

    def setup(self, setup: dict) -> None:
        device = kv_link_device(setup["backend"], self.runner.kv_caches[0].device)
        if setup["role"] == "prefill":
            self.sends = RankSends(KVLinkClient(device, timeout_s=setup["timeout_s"]), self.runner.kv_caches,
                                   self.st.rank)
            return
        bind, advertise = setup["bind_host"], setup["advertise_host"]
        if self.node.node_rank != 0:  # another machine: listen where node 0 reaches this one
            host, port = self.node.init_addr.rsplit(":", 1)
            bind = advertise = local_address_towards(host, int(port))
        events = EventBuffer()
        server = KVLinkServer(bind, 0, device, timeout_s=setup["timeout_s"], observer=events)
        self.endpoint = RankKVEndpoint(server, self.runner.kv_caches, self.st.rank, advertise)
        group = dist.new_group(backend="gloo")
        threading.Thread(target=self._control, args=(group, events), name="kv-rank-control", daemon=True).start()

    def _control(self, group, events: EventBuffer) -> None:
        try:
            follower_control(self.endpoint, group, events)
        except Exception as exc:  # noqa: BLE001 - the group broke; the step loop ends this rank too
            log.warning("KV control of rank %d ended: %s", self.st.rank, str(exc).splitlines()[0] if str(exc) else exc)

    def before_step(self, plan, chunks):
        if not plan or self.sends is None:
            return None
        return self.sends.before_step(plan, chunks)

    def close(self) -> None:
        if self.sends is not None:
            self.sends.close()
