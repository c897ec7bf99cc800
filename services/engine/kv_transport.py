"""The seam between the engine and whatever moves KV between workers (today: kv_link over
torch.distributed; NCCL on GPUs, gloo on CPU). Small Protocols, after vLLM's KV connector:

- scheduler side, decode worker (`RemoteKVConnector`): told when a request's blocks are allocated, so
  the worker can start the transfer, and when they are about to be freed, so it can stop it first;
- scheduler side, prefill worker (`KVSendGuard`): asked before a request's blocks go back to the pool,
  so that KV sent straight from them (no staging copy) is on the wire before they are reused;
- transport, prefill side (`KVSendPort`): one call per layer whose KV is ready (made once per layer
  by the model's layer loop, through `ForwardContext.on_layer_done`), then finish or cancel;
- transport, decode side (`KVReceivePort`): expect a transfer into given blocks, cancel it; the
  returned handle's `future` is done when every expected (layer, token) has landed.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import torch

    from glmserve.engine.request import Request


class RemoteKVConnector(Protocol):
    def blocks_allocated(self, req: "Request") -> None:
        """req.block_ids hold room for the prompt and its first token; the first
        req.num_computed_tokens tokens are already there (this worker's prefix cache)."""

    def request_freed(self, req: "Request") -> None:
        """Called on the engine thread before the blocks of a request waiting for remote KV go back to
        the pool: when it returns, nothing may write into them any more."""


class KVSendGuard(Protocol):
    def blocks_released(self, req: "Request") -> Future | None:
        """Prefill worker, engine thread: the request is about to give its blocks back (finished,
        aborted or preempted). A future done once no queued send reads them any more (the blocks stay
        allocated until then), or None when they may be reused at once."""


class KVSendPort(Protocol):
    def send_layer(self, transfer_id: int, layer: int, kv_cache_of_layer: "torch.Tensor",
                   block_ids: Sequence[int], start: int, count: int, *, copy: bool = True) -> None:
        """Send tokens [start, start + count) of one layer, read from P's blocks. copy=False: whole
        blocks may be read after this returns, until sent(transfer_id) is done."""

    def finish(self, transfer_id: int) -> Future:
        """Resolves with the bytes sent once everything queued for the transfer has gone."""

    def cancel(self, transfer_id: int) -> None: ...

    def sent(self, transfer_id: int) -> Future:
        """Done once nothing queued so far for the transfer reads P's blocks any more."""


class KVTransferHandle(Protocol):
    future: Future

    def cancel(self) -> None: ...


class KVReceivePort(Protocol):
    def new_transfer_id(self) -> int: ...

    def expect(self, transfer_id: int, kv_caches: Sequence["torch.Tensor"], dst_block_ids: Sequence[int],
               num_tokens: int, num_layers: int, first_token: int = 0) -> KVTransferHandle:
        """Tokens [first_token, num_tokens) of every layer will arrive into dst_block_ids."""

    def cancel(self, transfer_id: int) -> None:
        """After this returns nothing more is written into the transfer's blocks."""
