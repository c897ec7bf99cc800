"""The engine's structured-output state: a compiled-grammar cache and one matcher per request.

Engine hook (engine.py): `add` when a request arrives, `begin_masks` before the forward pass (the
bitmask of the rows about to be sampled is filled on a helper thread while the model runs), `apply`
to the logits after it, `accept` for every token appended, `remove` when the request ends."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import xgrammar as xgr

from glmserve.engine.structured_output.compiler import GrammarCompiler
from glmserve.engine.structured_output.matcher import RequestGrammar
from glmserve.engine.structured_output.spec import GrammarSpec

# Threads xgrammar may use to fill a batch's masks: half the cores, the rest run the model.
FILL_THREADS = max(1, (os.cpu_count() or 2) // 2)


@dataclass
class PendingMasks:
    """A bitmask being filled for the listed requests (row i = request_ids[i])."""

    request_ids: list[str]
    future: Future | None  # resolves to the rows that need masking; None when no row does


class StructuredOutputManager:
    def __init__(self, model_dir: str | Path | None, vocab_size: int, stop_token_ids: list[int]):
        self._model_dir = model_dir
        self._vocab_size = vocab_size
        self._stop_ids = stop_token_ids
        self._compiler: GrammarCompiler | None = None
        self.grammars: dict[str, RequestGrammar] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        self._bitmask: torch.Tensor | None = None
        self._compile_times_seen = 0
        self._batch = xgr.BatchGrammarMatcher(max_threads=FILL_THREADS)

    @property
    def compiler(self) -> GrammarCompiler:
        """Built on first use: engines that never see a grammar never read the vocabulary."""
        if self._compiler is None:
            if self._model_dir is None:
                raise ValueError("structured output needs the model's tokenizer; this model has none "
                                 "(dummy weights from a preset)")
            self._compiler = GrammarCompiler(self._model_dir, self._vocab_size, self._stop_ids)
        return self._compiler

    def compile(self, spec: GrammarSpec):
        """Compile (or fetch) a grammar; callable from any thread (AsyncEngine runs it off its loop)."""
        return self.compiler.get(spec)

    def drain_compile_times(self) -> list[float]:
        """Compile durations (seconds) since the last call, for the metrics."""
        if self._compiler is None:
            return []
        times = self._compiler.compile_seconds[self._compile_times_seen:]
        self._compile_times_seen += len(times)
        return times

    # -- per request ---------------------------------------------------------------------------
    def add(self, request_id: str, spec: GrammarSpec | None, stop_token_ids: frozenset[int]) -> None:
        if spec is None:
            return
        extra = self.compiler.json_safe_bitmask if spec.kind in ("json", "json_object") else None
        self.grammars[request_id] = RequestGrammar(spec, self.compile(spec), sorted(stop_token_ids), extra)

    def accept(self, request_id: str, token_id: int) -> None:
        g = self.grammars.get(request_id)
        if g is not None and not g.accept(token_id):
            raise RuntimeError(f"request {request_id}: token {token_id} broke its grammar")

    def replay(self, request_id: str, token_ids: list[int]) -> None:
        g = self.grammars.get(request_id)
        if g is not None:
            g.replay(token_ids)

    def remove(self, request_id: str) -> None:
        self.grammars.pop(request_id, None)

    # -- per step ------------------------------------------------------------------------------
    def begin_masks(self, request_ids: list[str]) -> PendingMasks | None:
        """Start filling the bitmask of these rows (the requests this step samples for), overlapping
        the forward pass. None when none of them is under an active grammar."""
        active = [(i, self.grammars[r]) for i, r in enumerate(request_ids)
                  if r in self.grammars and self.grammars[r].active]
        if not active:
            return None
        bitmask = self._bitmask_for(len(request_ids))

        def fill() -> list[int]:
            if len(active) == 1:
                i, g = active[0]
                return [i] if g.fill(bitmask, i) else []
            rows = [i for i, _ in active]
            # Many rows: xgrammar fills them on its own threads.
            self._batch.batch_fill_next_token_bitmask([g.matcher for _, g in active], bitmask, indices=rows)
            for i, g in active:
                g.and_extra_mask(bitmask, i)
            return rows

        return PendingMasks(request_ids, self._pool.submit(fill))

    def apply(self, pending: PendingMasks | None, logits: torch.Tensor, sampled_ids: list[str]) -> None:
        """Mask, in place, the logits rows (in `sampled_ids` order) of every request under a grammar."""
        if pending is None:
            return
        rows = pending.future.result()
        if not rows:
            return
        if sampled_ids != pending.request_ids:
            raise RuntimeError("the sampled rows differ from the rows whose grammar masks were filled")
        mask = self._bitmask[: len(sampled_ids)]
        xgr.apply_token_bitmask_inplace(logits, mask.to(logits.device, non_blocking=True),
                                        vocab_size=logits.shape[1], indices=rows)

    def _bitmask_for(self, batch: int) -> torch.Tensor:
        if self._bitmask is None or self._bitmask.shape[0] < batch:
            self._bitmask = xgr.allocate_token_bitmask(max(batch, 8), self.compiler.vocab_size)
        return self._bitmask
