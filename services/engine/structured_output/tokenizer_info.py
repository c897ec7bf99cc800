"""xgrammar's view of a model's vocabulary, read from tokenizer.json (no transformers needed)."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
import xgrammar as xgr


def _vocab_type(tokenizer_json: dict) -> xgr.VocabType:
    # GLM (like GPT-2/Qwen) is byte-level BPE; sentencepiece-style vocabs use <0xNN> byte fallback.
    decoder = json.dumps(tokenizer_json.get("decoder") or {})
    if "ByteLevel" in decoder:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in decoder:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def tokenizer_info(model_dir: str | Path, vocab_size: int, stop_token_ids: list[int]) -> xgr.TokenizerInfo:
    """vocab_size is the model's (logits width), which may exceed the tokenizer's: padding ids are
    never allowed by a grammar."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"structured output needs the model's tokenizer.json, not found in {model_dir}")
    tok = tokenizers.Tokenizer.from_file(str(path))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    # Control tokens (special: true) become "", which xgrammar never allows inside a grammar; the
    # markup tokens GLM keeps non-special (<tool_call>, <arg_key>, ...) stay usable as their text.
    for i, added in tok.get_added_tokens_decoder().items():
        if added.special:
            by_id[i] = ""
    encoded = [by_id.get(i, "") for i in range(max(by_id) + 1)]
    meta = json.loads(path.read_text(encoding="utf-8"))
    return xgr.TokenizerInfo(encoded, _vocab_type(meta), vocab_size=max(vocab_size, len(encoded)),
                             stop_token_ids=sorted(stop_token_ids))
