"""The prefill worker's MTP pass (speculative decoding across the split): after each forward, the MTP layer
runs over every position the step computed, as the one-process engine does, so its KV cache layer
(index num_hidden_layers) holds the prompt and can be streamed to the decode worker like the others.

The MTP input at position i is the token at i + 1 with the target's hidden state at i; at the last prompt
position that token is the one just sampled, so this runs after sampling, before requests finish.
"""

from __future__ import annotations

import torch

from glmserve.engine.spec_decode.mtp_speculator import _Chunk, _Shifted, _View


class PromptMTP:
    def __init__(self, engine):
        self.mtp = engine.loaded.model.mtp
        self.runner = engine.runner
        self.layer = engine.model_config.num_hidden_layers  # the MTP layer's KV cache index

    @torch.inference_mode()
    def run(self, steps: list[tuple], hidden: torch.Tensor, sampled: dict[str, int]) -> None:
        """steps: (request, first position, count) of each chunk, in the forward's row order; sampled:
        request id -> the token sampled after its last position (chunks that end their prompt)."""
        chunks = []
        for req, start, n in steps:
            ids = req.token_ids
            if req.request_id in sampled:
                ids = [*ids[start + 1 : start + n], sampled[req.request_id]]
                ids = _Shifted(ids, -start)
            else:
                ids = _Shifted(ids, 1)
            chunks.append(_Chunk(_View(req.request_id, ids, start, req.block_ids), n))
        input_ids, ctx = self.runner.inputs.build(chunks, self.runner.kv_caches)
        self.runner.backend.prepare(ctx)
        self.mtp(input_ids, ctx.positions, hidden, ctx)
