"""A prefill request's KV links when a TP group is on either side (PrefillRequest.kv_rank_links): the links of
prefill rank 0 (this process) become the transfer's `targets`; the followers' travel with the step messages
(kv_streamer.take_rank_plan). A plan this group cannot carry out (the decode worker assumed another size) is
refused, retriably: the decode worker asks this worker's size again."""

from __future__ import annotations

import torch

from glmserve.engine.kv_link import LinkAddress
from glmserve.engine.kv_sender import KVLinkClient
from glmserve.prefill.kv_streamer import Transfer


class RankLinkError(ValueError):
    pass


def rank_transfer(request, links: KVLinkClient, tp: int, cache: torch.Tensor, dst_cached: int) -> Transfer:
    """cache: one layer of this rank's cache (every rank's has the same shape)."""
    heads = cache.shape[3] if cache.dim() == 5 else 0  # GQA KV heads per rank; the MLA latent has none
    targets, followers = [], {}
    for link in request.kv_rank_links:
        if link.src_rank >= tp:
            raise RankLinkError(f"KV links planned from prefill rank {link.src_rank}; this prefill worker has "
                                f"{tp} rank(s)")
        if link.num_heads and link.src_head + link.num_heads > heads:
            raise RankLinkError(f"KV links planned for heads {link.src_head}..{link.src_head + link.num_heads - 1};"
                                f" each rank of this prefill worker holds {heads}")
        addr = LinkAddress(link.link.host, link.link.port, link.link.link_id)
        if link.src_rank == 0:
            targets.append((links.sender(addr), link.src_head, link.num_heads))
        else:
            followers.setdefault(link.src_rank, []).append((addr.host, addr.port, addr.name, link.src_head,
                                                            link.num_heads))
    return Transfer(targets[0][0] if targets else None, request.transfer_id, sent_upto=dst_cached, mtp=request.mtp,
                    targets=targets, rank_links=followers or None)
