"""What travels on a KV link: the fixed-size message header, and how tokens' KV is cut out of / put
into a paged cache.

Every message is one int64 header of HEADER_LEN values, then (for KV messages) one payload of
`numel` elements of `dtype`: the KV of tokens `start .. start+count-1` of one layer, in one of two
layouts, named by the header's `block_size`:
- 0: token-major (`[count, 2, Hkv, D]` for GQA, `[count, latent_dim]` for MLA), for tokens that do
  not fill whole blocks (the head and tail of a chunk);
- bs > 0: `count / bs` whole blocks as the sender's paged cache lays them out (`[n, 2, bs, Hkv, D]`
  or `[n, bs, latent_dim]`), `start` a multiple of bs. A block is contiguous in the cache, so runs of
  consecutive blocks are sent from and received into the caches without gathering token rows; when the
  receiver's blocks are not consecutive, or its block size differs, it converts.
Token positions (not block ids) on the wire let the two sides use different block ids and block sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

HEADER_LEN = 9
MAGIC = 0x4B56  # "KV": a desynchronised stream shows up as a bad header, not as silent garbage

# Message kinds.
KV = 1  # payload follows
DONE = 2  # sender has sent everything of the transfer
CANCEL = 3  # sender dropped the transfer; later data for it must be ignored
HEARTBEAT = 4  # keeps an idle link inside the receiver's timeout
CLOSE = 5  # sender is going away cleanly

# Dtype codes on the wire; both ends must agree on the cache dtype, the header lets the receiver check.
_DTYPES: list[torch.dtype] = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8,
    torch.float8_e4m3fn, torch.float8_e5m2,
]


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype)


@dataclass(frozen=True)
class Header:
    kind: int
    transfer_id: int = 0
    layer: int = 0
    start: int = 0
    count: int = 0
    numel: int = 0
    dtype: torch.dtype = torch.uint8
    block_size: int = 0  # 0: token-major payload; > 0: whole blocks of this many tokens

    def encode(self) -> torch.Tensor:
        code = dtype_code(self.dtype)
        vals = [MAGIC, self.kind, self.transfer_id, self.layer, self.start, self.count, self.numel, code,
                self.block_size]
        return torch.tensor(vals, dtype=torch.int64)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize if self.kind == KV else 0

    @staticmethod
    def decode(buf: torch.Tensor) -> "Header":
        magic, kind, tid, layer, start, count, numel, code, bs = buf.tolist()
        if (magic != MAGIC or not 0 <= code < len(_DTYPES) or min(tid, layer, start, count, numel, bs) < 0
                or (bs and (start % bs or count % bs))):
            raise ValueError(f"corrupt KV link header {buf.tolist()}")
        return Header(kind, tid, layer, start, count, numel, _DTYPES[code], bs)


def block_size_of(cache: torch.Tensor) -> int:
    """Tokens per block of a layer cache: GQA `[N, 2, bs, Hkv, D]`, MLA `[N, bs, latent]`."""
    if cache.dim() == 5:
        return cache.shape[2]
    if cache.dim() == 3:
        return cache.shape[1]
    raise ValueError(f"not a paged KV layer cache: shape {tuple(cache.shape)}")


def token_shape(cache: torch.Tensor) -> tuple[int, ...]:
    """Shape of one token's KV in the payload."""
    if cache.dim() == 5:
        return (2, cache.shape[3], cache.shape[4])
    return (cache.shape[2],)


def token_slots(
    block_ids: Sequence[int] | torch.Tensor, block_size: int, start: int, count: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block index, offset in block) of tokens start..start+count-1 of a sequence."""
    ids = torch.as_tensor(block_ids, dtype=torch.int64)
    if start < 0 or count < 0 or -(-(start + count) // block_size) > ids.numel():
        raise ValueError(f"tokens {start}..{start + count} do not fit in {ids.numel()} blocks of {block_size}")
    pos = torch.arange(start, start + count, dtype=torch.int64)
    return ids[pos // block_size].to(device), (pos % block_size).to(device)


def _rows(cache: torch.Tensor, blk: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache as a table of rows, and the rows of those tokens in token-major payload order.

    Row copies (index_select / index_copy_) run near memcpy speed; plain advanced indexing on the 5-D GQA
    cache was 4x slower on CPU.
    """
    if cache.dim() == 5:  # rows of Hkv*D: block b holds K rows b*2*bs + o and V rows b*2*bs + bs + o
        bs = cache.shape[2]
        k = blk * (2 * bs) + off
        # A rank's slice of the KV heads (TP links) is a view whose first three dims still merge: its
        # rows stay rows, [h, D] each, strided.
        table = cache.view(-1, cache.shape[3] * cache.shape[4]) if cache.is_contiguous() else cache.flatten(0, 2)
        return table, torch.stack([k, k + bs], 1).reshape(-1)
    return cache.view(-1, cache.shape[2]), blk * cache.shape[1] + off


def gather_tokens(cache: torch.Tensor, blk: torch.Tensor, off: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """A contiguous `[count, *token_shape]` copy of those tokens' KV (the cache may be reused after),
    written into `out` (any contiguous tensor of that many elements and the cache's dtype) when given."""
    table, rows = _rows(cache, blk, off)
    if out is None:
        return table.index_select(0, rows).view(blk.numel(), *token_shape(cache))
    torch.index_select(table, 0, rows, out=out.view(rows.numel(), *table.shape[1:]))
    return out.view(blk.numel(), *token_shape(cache))


def scatter_tokens(cache: torch.Tensor, blk: torch.Tensor, off: torch.Tensor, values: torch.Tensor) -> None:
    table, rows = _rows(cache, blk, off)
    table.index_copy_(0, rows, values.reshape(rows.numel(), *table.shape[1:]))  # a view: lands in the cache


def split_at_blocks(start: int, count: int, block_size: int) -> list[tuple[int, int, bool]]:
    """Tokens start..start+count-1 as (start, count, whole_blocks) pieces: the head up to the first block
    boundary and the tail after the last one go token-major, the whole blocks between them as blocks."""
    head = min(count, -start % block_size)
    full = (count - head) // block_size * block_size
    pieces = [(start, head, False), (start + head, full, True), (start + head + full, count - head - full, False)]
    return [p for p in pieces if p[1] > 0]


def consecutive_start(ids: torch.Tensor) -> int | None:
    """ids[0] when ids is a run of consecutive block ids (one contiguous region of the cache), else None."""
    first = int(ids[0])
    if ids.numel() == 1 or bool((ids == torch.arange(first, first + ids.numel(), dtype=ids.dtype)).all()):
        return first
    return None


def consecutive_runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """ids as runs of consecutive block ids: (index of the run's first id in ids, first block id, length)."""
    vals = ids.tolist()
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(vals):
        if runs and b == runs[-1][1] + runs[-1][2]:
            at, first, n = runs[-1]
            runs[-1] = (at, first, n + 1)
        else:
            runs.append((i, b, 1))
    return runs


def blocks_as_tokens(payload: torch.Tensor, token_shape_: tuple[int, ...], block_size: int) -> torch.Tensor:
    """A whole-blocks payload (flat, in the sender's block layout) as token-major `[n * bs, *token_shape]`."""
    if len(token_shape_) == 3:  # GQA block [2, bs, Hkv, D] -> tokens [bs, 2, Hkv, D]
        two, hkv, d = token_shape_
        blocks = payload.view(-1, two, block_size, hkv, d)
        return blocks.permute(0, 2, 1, 3, 4).reshape(-1, two, hkv, d)
    return payload.view(-1, *token_shape_)
