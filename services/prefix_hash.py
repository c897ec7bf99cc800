"""Content hashes of full KV blocks, shared by the engine (prefix cache) and the router (prefix-aware
routing). Torch-free on purpose: the router imports it.

A block's hash chains its parent's, so equal hashes at block i mean the whole prefix up to i matches.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Sequence

ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Stable 64-bit hash of one block's tokens, chained from its parent block's hash."""
    h = hashlib.blake2b(parent_hash.to_bytes(8, "little"), digest_size=8)
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def extend_chain(hashes: list[int], token_ids: Sequence[int], block_size: int) -> list[int]:
    """Append to `hashes` (those of the first len(hashes) blocks) the hashes of the remaining full blocks
    of token_ids. Only new blocks are hashed, so growing a sequence costs per new block, not per token."""
    parent = hashes[-1] if hashes else ROOT_HASH
    for b in range(len(hashes), len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[b * block_size : (b + 1) * block_size])
        hashes.append(parent)
    return hashes


def chain_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hashes of every full block of token_ids."""
    return extend_chain([], token_ids, block_size)
