"""A model directory's tokenizer: tokenizer.json through the `tokenizers` library, plus its chat template and
stop ids. Encodes and decodes exactly as transformers' fast tokenizer on the same directory, without
importing transformers (which is slow to import and not a runtime dependency)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import tokenizers

from glmserve.engine.chat_template import render_chat_template, select_chat_template

# Named special tokens in tokenizer_config.json; transformers passes these to chat templates.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                        "mask_token")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config writes a token either as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._tok = tokenizers.Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.config = _read_json(self.model_dir / "tokenizer_config.json")
        jinja_file = self.model_dir / "chat_template.jinja"
        # As in transformers, a chat_template.jinja file wins over tokenizer_config's chat_template.
        self.chat_template = (jinja_file.read_text(encoding="utf-8") if jinja_file.is_file()
                              else self.config.get("chat_template"))
        self.special_tokens_map = {name: text for name in NAMED_SPECIAL_TOKENS
                                   if (text := _token_text(self.config.get(name))) is not None}
        self._special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self.eos_token_ids = self._load_eos_token_ids()

    def _load_eos_token_ids(self) -> tuple[int, ...]:
        """Stop ids: generation_config.json, else config.json, plus the tokenizer's own eos_token."""
        ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            ids = _id_list(_read_json(self.model_dir / name).get("eos_token_id"))
            if ids:
                break
        own = self.token_to_id(self.special_tokens_map.get("eos_token", ""))
        if own is not None and own not in ids:
            ids.append(own)
        return tuple(ids)

    # -- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' len(tokenizer))."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token) if token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """True for added tokens marked special, the ones decode(skip_special_tokens=True) drops."""
        return token_id in self._special_ids

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens_map.get("eos_token", ""))

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens_map.get("pad_token", ""))

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens_map.get("bos_token", ""))

    # -- text ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list, tools: list | None = None, add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render the conversation with this model's template; kwargs (enable_thinking, ...) reach the template."""
        template = select_chat_template(self.chat_template, tools)
        text = render_chat_template(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens_map, **kwargs)
        return self.encode(text) if tokenize else text
