"""One request's grammar state: an xgrammar matcher fed every generated token.

With `start_after_token_id` (reasoning models) the matcher sleeps through the thinking block and
starts on the token after it; until then the request samples freely."""

from __future__ import annotations

import torch
import xgrammar as xgr

from glmserve.engine.structured_output.spec import GrammarSpec


class RequestGrammar:
    def __init__(self, spec: GrammarSpec, compiled: xgr.CompiledGrammar, stop_token_ids: list[int],
                 extra_mask: torch.Tensor | None = None):
        self.spec = spec
        self.extra_mask = extra_mask  # ANDed into every filled row (e.g. no control characters in JSON)
        # The request's own eos ids end the grammar (the model's may differ from the tokenizer's).
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_token_ids) or None)
        self.started = spec.start_after_token_id is None
        self.num_accepted = 0

    @property
    def active(self) -> bool:
        """Whether the next token must follow the grammar."""
        return self.started and not self.matcher.is_terminated()

    def accept(self, token_id: int) -> bool:
        """Advance past a generated token; False when the grammar did not allow it (a bug upstream)."""
        if not self.started:
            self.started = token_id == self.spec.start_after_token_id
            return True
        if self.matcher.is_terminated():
            return True
        ok = self.matcher.accept_token(token_id)
        self.num_accepted += ok
        return ok

    def replay(self, token_ids: list[int]) -> None:
        """Catch up with tokens sampled elsewhere (the prefill worker's first token)."""
        for t in token_ids:
            if not self.accept(t):
                raise ValueError(f"token {t} does not follow the request's grammar")

    def fill(self, bitmask, row: int) -> bool:
        """Write this row of the bitmask; True when it masks anything."""
        masks = self.matcher.fill_next_token_bitmask(bitmask, row)
        return self.and_extra_mask(bitmask, row) or masks

    def and_extra_mask(self, bitmask, row: int) -> bool:
        if self.extra_mask is None:
            return False
        bitmask[row].bitwise_and_(self.extra_mask)
        return True
