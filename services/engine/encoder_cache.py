"""Vision-encoder outputs by image content hash, so a repeated image (or the next chunk of a prefill that
splits an image) is not encoded again. Least recently used entries go first once the cache holds more
than `max_tokens` embedding rows."""

from __future__ import annotations

from collections import OrderedDict

import torch

DEFAULT_MAX_TOKENS = 16384


class EncoderCache:
    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._tokens = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, content_hash: str) -> torch.Tensor | None:
        emb = self._entries.get(content_hash)
        if emb is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(content_hash)
        return emb

    def put(self, content_hash: str, embeddings: torch.Tensor) -> None:
        if content_hash in self._entries:
            return
        self._entries[content_hash] = embeddings
        self._tokens += embeddings.shape[0]
        # Never evict the entry just added: the step that encoded it is about to read it.
        while self._tokens > self.max_tokens and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self._tokens -= old.shape[0]
