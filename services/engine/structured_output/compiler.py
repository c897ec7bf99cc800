"""Compiles each distinct grammar once per worker (an LRU of compiled grammars) and times it."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
import xgrammar as xgr

from glmserve.engine.structured_output.spec import GrammarSpec
from glmserve.engine.structured_output.tokenizer_info import tokenizer_info

CACHE_SIZE = 256


class GrammarError(ValueError):
    """A grammar the compiler refuses (bad schema, regex or EBNF): the request's fault."""


def _choice_grammar(value: str) -> str:
    # One alternative per choice, each as a JSON string literal (EBNF string escapes match JSON's).
    return "root ::= " + " | ".join(json.dumps(c) for c in json.loads(value))


def _json_safe_bitmask(info: xgr.TokenizerInfo) -> torch.Tensor:
    """[ceil(V/32)] int32 bitmask of the tokens without raw control characters (bytes < 0x20).

    JSON never has them unescaped (inside strings they must be escaped; our compact JSON has no
    whitespace but spaces), yet xgrammar's JSON string rule lets them through; ANDed into the masks
    of JSON grammars so every output parses with a strict JSON parser."""
    vocab = info.vocab_size
    ok = torch.zeros(-(-vocab // 32) * 32, dtype=torch.bool)
    for i, token in enumerate(info.decoded_vocab[:vocab]):
        ok[i] = not any(b < 0x20 for b in token)
    for i in info.stop_token_ids:
        ok[i] = True
    weights = torch.tensor([1 << k for k in range(32)], dtype=torch.int64)
    words = (ok.view(-1, 32).to(torch.int64) * weights).sum(dim=1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


class GrammarCompiler:
    """Thread-safe: workers compile off their event loop (AsyncEngine) while the engine thread reads."""

    def __init__(self, model_dir: str | Path, vocab_size: int, stop_token_ids: list[int],
                 cache_size: int = CACHE_SIZE):
        self._info = tokenizer_info(model_dir, vocab_size, stop_token_ids)
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_size = cache_size
        self.json_safe_bitmask = _json_safe_bitmask(self._info)
        self.compile_seconds: list[float] = []  # one entry per cache miss, for metrics and benchmarks
        self.hits = 0

    @property
    def vocab_size(self) -> int:
        return self._info.vocab_size

    def get(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        key = spec.cache_key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        start = time.perf_counter()
        compiled = self._compile(spec)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.compile_seconds.append(elapsed)
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def cached(self, spec: GrammarSpec) -> bool:
        with self._lock:
            return spec.cache_key in self._cache

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        c = self._compiler
        try:
            if spec.kind == "json":
                # Compact JSON (no free whitespace): a model cannot stall in endless blanks.
                return c.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
            if spec.kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if spec.kind == "regex":
                return c.compile_regex(spec.value)
            if spec.kind == "choice":
                return c.compile_grammar(_choice_grammar(spec.value))
            if spec.kind == "grammar":
                return c.compile_grammar(spec.value)
            return c.compile_structural_tag(spec.value)
        except (RuntimeError, ValueError, TypeError, xgr.InvalidJSONError, xgr.InvalidStructuralTagError) as exc:
            raise GrammarError(f"could not compile the {spec.kind} grammar: {str(exc).strip().splitlines()[0]}") from None
