"""Each step's model inputs, built from persistent host tensors so that host work follows the tokens
that changed, not the context length.

Every live request owns a row of a block table kept between steps; a step writes only the blocks a
request gained since the last one. Positions and slot mappings are computed with tensor ops from
per-sequence starts and lengths, so a decode step costs O(batch) Python, whatever the context.
`attention.context.build_context` is the plain reference this must agree with (tested).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from glmserve.engine.attention.context import ForwardContext

_INITIAL_ROWS = 64


class StepInputBuilder:
    def __init__(self, max_blocks_per_seq: int, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        self.table = torch.zeros(_INITIAL_ROWS, max_blocks_per_seq, dtype=torch.int32)
        self._row_of: dict[str, int] = {}
        self._known = [0] * _INITIAL_ROWS  # blocks of each row already written
        self._free_rows = list(range(_INITIAL_ROWS - 1, -1, -1))

    def release(self, request_ids: Sequence[str]) -> None:
        """Forget requests whose blocks went back to the pool (finished, aborted, preempted)."""
        for rid in request_ids:
            row = self._row_of.pop(rid, None)
            if row is not None:
                self._known[row] = 0
                self._free_rows.append(row)

    def _row(self, request_id: str) -> int:
        row = self._row_of.get(request_id)
        if row is None:
            if not self._free_rows:
                self._grow()
            row = self._row_of[request_id] = self._free_rows.pop()
        return row

    def _grow(self) -> None:
        old = self.table.shape[0]
        self.table = torch.cat([self.table, torch.zeros_like(self.table)])
        self._known += [0] * old
        self._free_rows += range(2 * old - 1, old - 1, -1)

    def build(self, chunks, kv_caches: list[torch.Tensor],
              on_layer_done: Callable[[int], None] | None = None) -> tuple[torch.Tensor, ForwardContext]:
        """(input ids [T], context) for a step over `chunks` (ScheduledChunk: request + num_new_tokens)."""
        bs = self.block_size
        ids: list[int] = []
        rows: list[int] = []
        starts: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        width = 1
        for c in chunks:
            req, n = c.request, c.num_new_tokens
            start = req.num_computed_tokens
            row = self._row(req.request_id)
            have, blocks = self._known[row], req.block_ids
            if len(blocks) > have:
                self.table[row, have : len(blocks)] = torch.tensor(blocks[have:], dtype=torch.int32)
                self._known[row] = len(blocks)
            need = -(-(start + n) // bs)
            if len(blocks) < need:
                raise ValueError(f"sequence needs {need} blocks for {start + n} tokens, has {len(blocks)}")
            width = max(width, len(blocks))
            ids += req.token_ids[start : start + n]
            rows.append(row)
            starts.append(start)
            query_lens.append(n)
            seq_lens.append(start + n)
        block_tables = self.table[:, :width].index_select(0, torch.tensor(rows, dtype=torch.int64))
        lens = torch.tensor(query_lens, dtype=torch.int64)
        qsl = torch.zeros(len(chunks) + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=qsl[1:])
        num_tokens = len(ids)
        if num_tokens == len(chunks):  # decode only: one token per sequence
            positions = torch.tensor(starts, dtype=torch.int64)
            seq_index = torch.arange(len(chunks))
        else:
            seq_index = torch.repeat_interleave(torch.arange(len(chunks)), lens)
            offsets = torch.arange(num_tokens, dtype=torch.int64) - qsl[:-1].repeat_interleave(lens)
            positions = torch.tensor(starts, dtype=torch.int64).repeat_interleave(lens) + offsets
        slots = block_tables[seq_index, positions // bs].to(torch.int64) * bs + positions % bs
        dev = self.device
        ctx = ForwardContext(
            positions=positions.to(dev), query_start_loc=qsl.to(device=dev, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev), block_tables=block_tables.to(dev),
            slot_mapping=slots.to(dev), block_size=bs, kv_caches=kv_caches, query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens, on_layer_done=on_layer_done)
        return torch.tensor(ids, dtype=torch.int64, device=dev), ctx
