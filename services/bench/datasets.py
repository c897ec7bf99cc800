"""Benchmark prompts: random, ShareGPT-style conversations, and prefix-repetition.

Every generator is deterministic in its seed. With a tokenizer, prompt text is built from random token ids
so its length in tokens is controlled and known (`prompt_len`); without one, prompts are random words and
their length is learned from the server's usage report instead (`prompt_len` is None).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

# Common English words: without a tokenizer one word is roughly one token for most BPE vocabularies.
_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not but which you "
    "they we his her their one all there can more were has been when will would what about so if out up "
    "into them some time only other then its also two how than first new very after most model token "
    "server request response prompt cache block batch layer memory latency stream output input value "
    "function result weather city question answer number list file error return name type object text"
).split()

# Re-encoding decoded random ids can merge or split tokens; a few rounds of trimming/padding converge.
_LENGTH_FIT_ROUNDS = 10


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def is_special(self, token_id: int) -> bool: ...


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int | None  # tokens, when a tokenizer measured it (text only: images come on top)
    output_len: int
    images: tuple[str, ...] = ()  # image data URLs (random-mm), sent before the text


class RandomText:
    """Random prompt text of a given token length (tokenizer) or word count (no tokenizer)."""

    def __init__(self, tokenizer: TextTokenizer | None):
        self.tokenizer = tokenizer
        self._pool: list[int] = self._clean_ids(tokenizer) if tokenizer is not None else []

    @staticmethod
    def _clean_ids(tok: TextTokenizer) -> list[int]:
        # Byte-fallback pieces decode to U+FFFD alone and re-encode to several tokens; special tokens are
        # dropped by decode. Keeping only ids that round-trip on their own makes lengths fit quickly.
        pool = []
        for i in range(tok.vocab_size):
            if tok.is_special(i):
                continue
            text = tok.decode([i])
            if text and "\ufffd" not in text and tok.encode(text) == [i]:
                pool.append(i)
        if not pool:
            raise ValueError("tokenizer has no ids that decode and re-encode to themselves")
        return pool

    def make(self, rng: random.Random, length: int) -> tuple[str, int | None]:
        """Returns (text, token length or None without a tokenizer)."""
        if self.tokenizer is None:
            return " ".join(rng.choice(_WORDS) for _ in range(length)), None
        tok = self.tokenizer
        ids = [rng.choice(self._pool) for _ in range(length)]
        text = tok.decode(ids)
        for _ in range(_LENGTH_FIT_ROUNDS):
            ids = tok.encode(text)
            if len(ids) == length:
                break
            if len(ids) > length:
                ids = ids[:length]
            else:
                ids = ids + [rng.choice(self._pool) for _ in range(length - len(ids))]
            text = tok.decode(ids)
        return text, len(tok.encode(text))


def _length(rng: random.Random, mean: int, range_ratio: float) -> int:
    # Uniform in [mean*(1-r), mean*(1+r)], as vLLM's random dataset; at least one token.
    low, high = int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio) + 0.5)
    return max(1, rng.randint(low, max(low, high)))


def _check_ratio(range_ratio: float) -> None:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                    tokenizer: TextTokenizer | None = None) -> list[SampleRequest]:
    _check_ratio(range_ratio)
    rng = random.Random(seed)
    text = RandomText(tokenizer)
    out = []
    for _ in range(num_prompts):
        prompt, prompt_len = text.make(rng, _length(rng, input_len, range_ratio))
        out.append(SampleRequest(prompt, prompt_len, _length(rng, output_len, range_ratio)))
    return out


def prefix_repetition_requests(num_prompts: int, prefix_len: int, num_prefixes: int, suffix_len: int,
                               output_len: int, seed: int,
                               tokenizer: TextTokenizer | None = None) -> list[SampleRequest]:
    """`num_prefixes` shared prefixes, each followed by a unique random suffix; prompts are shuffled so
    requests sharing a prefix do not arrive back to back (prefix caching must find them)."""
    if num_prefixes < 1:
        raise ValueError("--num-prefixes must be at least 1")
    rng = random.Random(seed)
    text = RandomText(tokenizer)
    prefixes = [text.make(rng, prefix_len)[0] for _ in range(num_prefixes)]
    out = []
    for i in range(num_prompts):
        suffix, _ = text.make(rng, suffix_len)
        prompt = f"{prefixes[i % num_prefixes]} {suffix}"
        prompt_len = len(tokenizer.encode(prompt)) if tokenizer is not None else None
        out.append(SampleRequest(prompt, prompt_len, output_len))
    rng.shuffle(out)
    return out


def _turn_text(turn: dict) -> str:
    return str(turn.get("value", turn.get("content", "")))


def _turn_role(turn: dict) -> str:
    return str(turn.get("from", turn.get("role", ""))).lower()


def _first_exchange(entry: dict) -> tuple[str, str] | None:
    """The first user turn and the assistant reply that follows it."""
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    for ask, reply in zip(turns, turns[1:]):
        if (isinstance(ask, dict) and isinstance(reply, dict) and _turn_role(ask) in ("human", "user")
                and _turn_role(reply) in ("gpt", "assistant", "chatgpt", "bard", "model")):
            return _turn_text(ask), _turn_text(reply)
    return None


def sharegpt_requests(path: str | Path, num_prompts: int, seed: int, tokenizer: TextTokenizer | None = None,
                      output_len: int | None = None) -> list[SampleRequest]:
    """First exchange of randomly chosen conversations. The reply's length sets max_tokens (tokens with a
    tokenizer, else words) unless `output_len` fixes it. Conversations are reused when the file has fewer
    than `num_prompts` usable ones, so the request count is always what was asked."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'conversations': [...]}} objects")
    exchanges = [ex for ex in map(_first_exchange, data) if ex is not None and ex[0].strip()]
    if not exchanges:
        raise ValueError(f"{path}: no conversation starts with a user turn followed by a reply")
    rng = random.Random(seed)
    rng.shuffle(exchanges)
    out = []
    for i in range(num_prompts):
        prompt, reply = exchanges[i % len(exchanges)]
        if tokenizer is not None:
            prompt_len: int | None = len(tokenizer.encode(prompt))
            reply_len = len(tokenizer.encode(reply))
        else:
            prompt_len, reply_len = None, len(reply.split())
        out.append(SampleRequest(prompt, prompt_len, output_len if output_len is not None else max(1, reply_len)))
    return out
