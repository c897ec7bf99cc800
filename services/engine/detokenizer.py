"""Streaming text out of token ids: an incremental detokenizer and a stop-string matcher.

Byte-level BPE can split one character over several tokens, and decoding such a prefix yields U+FFFD.
The detokenizer only emits text that later tokens can no longer change, so the deltas concatenate to
exactly the full decode and never carry a half character.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded ahead of the output: some decoders render a token differently at the start of a
# sequence (SentencePiece drops the leading space), so the output is decoded in context.
_CONTEXT_TOKENS = 5


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Feed output token ids with push(); get back only new, final text.

    The window ids[start:] is decoded on each push; `done` counts its leading characters that are already
    accounted for (the prompt context, or emitted text). Text ending in U+FFFD is held back until a later
    token completes the character; flush() gives up on that at the end of a stream.

    spaces_between_special_tokens is accepted for SamplingParams parity; a `tokenizers` decoder (like
    transformers' fast tokenizers) never inserts such spaces, so it has no effect here.
    """

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.output_ids: list[int] = []
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        context_text = self._decode(context)
        if context_text.endswith(_REPLACEMENT):
            # The prompt ends inside a character; the output must not complete it into its own text.
            context, context_text = [], ""
        self._ids = context
        self._start = 0
        self._done = len(context_text)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: Sequence[int]) -> str:
        """Append output tokens; return the text they completed (possibly empty)."""
        if not token_ids:
            return ""
        self.output_ids.extend(token_ids)
        self._ids.extend(token_ids)
        text = self._decode(self._ids[self._start:])
        stable = text.rstrip(_REPLACEMENT)
        delta = stable[self._done:] if len(stable) > self._done else ""
        self._done += len(delta)
        if len(stable) == len(text):
            # Everything decoded is final: slide the window to keep decoding cost bounded, keeping a few
            # tokens of context for decoders that look back.
            new_start = max(self._start, len(self._ids) - _CONTEXT_TOKENS)
            if new_start > self._start:
                self._done = len(self._decode(self._ids[new_start:]))
                self._start = new_start
        return delta

    def flush(self) -> str:
        """End of stream: return held-back text (a character the output never completed shows as U+FFFD)."""
        text = self._decode(self._ids[self._start:])
        delta = text[self._done:] if len(text) > self._done else ""
        self._done += len(delta)
        return delta


class StopCheck(NamedTuple):
    text: str  # text that may be emitted now
    stopped: bool
    matched_stop: str | None


class StopStringMatcher:
    """Cut a text stream at the first stop string, never emitting any part of a stop string.

    A suffix that could still grow into a stop string is held back until it either completes one or
    diverges. Among matches, the one that completes first wins (then the one starting first), so the result
    does not depend on how the text was split into deltas.
    """

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool = False):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(dict.fromkeys(stops))
        self.include_stop_str_in_output = include_stop_str_in_output
        self._held = ""
        self.stopped = False
        self.matched_stop: str | None = None

    def feed(self, delta: str) -> StopCheck:
        if self.stopped:
            return StopCheck("", True, self.matched_stop)
        buf = self._held + delta
        match = self._first_match(buf)
        if match is not None:
            start, stop = match
            self.stopped, self.matched_stop, self._held = True, stop, ""
            end = start + len(stop) if self.include_stop_str_in_output else start
            return StopCheck(buf[:end], True, stop)
        keep = self._partial_suffix_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return StopCheck(buf[:len(buf) - keep], False, None)

    def flush(self) -> str:
        """End of stream without a match: the held-back text was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stops:
            start = buf.find(stop)
            if start >= 0:
                cand = (start + len(stop), start, stop)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        return None if best is None else (best[1], best[2])

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:n]):
                    longest = n
                    break
        return longest
