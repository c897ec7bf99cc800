"""Tokenizer on the tiny GLM assets: same ids and text as transformers, GLM's special-token flags, eos ids,
template lookup, the asset generator, and (lightly) the tiny model builder."""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from glmserve.engine.tiny_tokenizer import (
    EOS_TOKENS,
    MARKUP_TOKENS,
    SPECIAL_TOKENS,
    TINY_ASSETS_DIR,
    TinyTokenizerInfo,
    train_tiny_tokenizer,
    write_tiny_tokenizer,
)
from glmserve.engine.tokenizer import Tokenizer

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "numbers 1234567 and 3.14159, -42",
    "def f(x):\n    return x ** 2  # square",
    '{"city": "Paris", "days": 3, "ok": true}',
    "你好，世界！今天天气很好。",
    "日本語のテキストと한국어",
    "emoji 😀🚀✨👍🏽 and ZWJ 👩‍💻",
    "accents: café naïve Ærøskøbing ß",
    "[gMASK]<sop><|system|>Be brief.<|user|>hi<|assistant|>",
    "<think>plan it</think>answer<tool_call>get_weather<arg_key>city</arg_key>"
    "<arg_value>Köln</arg_value></tool_call>",
    "<|observation|><tool_response>{\"t\": 21}</tool_response><|endoftext|>",
    "/nothink please <|image|><|begin_of_image|><|end_of_image|>",
    "almost<|user|special <think and </ think>",
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer(TINY_ASSETS_DIR)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TINY_ASSETS_DIR))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_special_tokens=True) == hf.encode(text, add_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_vocab_and_specials_match_transformers(ours, hf):
    assert ours.vocab_size == len(hf) == 1000
    for token in SPECIAL_TOKENS + MARKUP_TOKENS:
        tid = ours.token_to_id(token)
        assert tid is not None and tid == hf.convert_tokens_to_ids(token)
        assert ours.id_to_token(tid) == token
        assert ours.encode(token) == [tid]  # one id each, never split by BPE
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.bos_token_id is None and hf.bos_token is None


def test_glm_special_flags(ours):
    # Control tokens are dropped by skip_special_tokens; reasoning/tool markup must survive for the parsers.
    assert all(ours.is_special(ours.token_to_id(t)) for t in SPECIAL_TOKENS)
    assert not any(ours.is_special(ours.token_to_id(t)) for t in MARKUP_TOKENS)
    ids = ours.encode("<|assistant|><think>r</think>x<tool_call>f</tool_call><|user|>")
    assert ours.decode(ids) == "<think>r</think>x<tool_call>f</tool_call>"
    assert not ours.is_special(ours.encode("a")[0])


def test_eos_ids_from_tokenizer_config_then_generation_config(ours, tmp_path):
    assert ours.eos_token_ids == (ours.token_to_id("<|endoftext|>"),)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_ASSETS_DIR / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer(tmp_path).eos_token_ids == (5, 967)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [967, 974, 976]}))
    assert Tokenizer(tmp_path).eos_token_ids == (967, 974, 976)


def test_chat_template_file_wins_over_tokenizer_config(tmp_path):
    shutil.copy(TINY_ASSETS_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((TINY_ASSETS_DIR / "tokenizer_config.json").read_text())
    config["chat_template"] = "CONFIG{{ messages[0].content }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    msgs = [{"role": "user", "content": "x"}]
    assert Tokenizer(tmp_path).apply_chat_template(msgs) == "CONFIGx"
    (tmp_path / "chat_template.jinja").write_text("FILE{{ messages[0].content }}{{ eos_token }}")
    assert Tokenizer(tmp_path).apply_chat_template(msgs) == "FILEx<|endoftext|>"


def test_named_chat_templates_pick_tool_use(tmp_path):
    shutil.copy(TINY_ASSETS_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]}))
    tok = Tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == "plain"
    assert tok.apply_chat_template(msgs, tools=[{"type": "function", "function": {"name": "f"}}]) == "tools"


def test_apply_chat_template_tokenize(ours):
    msgs = [{"role": "user", "content": "hi"}]
    text = ours.apply_chat_template(msgs)
    ids = ours.apply_chat_template(msgs, tokenize=True)
    assert text == "[gMASK]<sop><|user|>hi<|assistant|><think>"
    assert ids == ours.encode(text)
    assert ids[:2] == [ours.token_to_id("[gMASK]"), ours.token_to_id("<sop>")]


def test_generator_is_deterministic_and_matches_shipped_file():
    shipped = json.loads((TINY_ASSETS_DIR / "tokenizer.json").read_text())
    assert json.loads(train_tiny_tokenizer().to_str()) == shipped


def test_write_tiny_tokenizer(tmp_path):
    info = write_tiny_tokenizer(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    tok = Tokenizer(tmp_path / "m")
    assert isinstance(info, TinyTokenizerInfo)
    assert info.vocab_size == tok.vocab_size == 1000
    assert info.eos_token_ids == tuple(tok.token_to_id(t) for t in EOS_TOKENS)
    assert info.pad_token_id == tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert info.bos_token_id is None
    with pytest.raises(AttributeError):
        info.vocab_size = 5  # frozen


def test_build_tiny_model_and_default_dir(tmp_path):
    pytest.importorskip("glmserve.engine.tiny_checkpoint", reason="tiny_checkpoint is written by another engineer")
    from glmserve.engine.tiny_model import build_tiny_model, default_tiny_model_dir

    out = build_tiny_model("glm4_moe", tmp_path / "m", seed=1)
    config = json.loads((out / "config.json").read_text())
    tok = Tokenizer(out)
    assert config["vocab_size"] == tok.vocab_size
    assert tok.eos_token_ids == tuple(tok.token_to_id(t) for t in EOS_TOKENS)  # via generation_config.json

    # Two builders racing on an empty cache both get the same, complete directory and leave no temp dirs.
    cache = tmp_path / "cache"
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(default_tiny_model_dir(cache))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in cache.iterdir()] == [results[0].name]
    assert (results[0] / "config.json").is_file() and (results[0] / "tokenizer.json").is_file()
    stamp = (results[0] / "config.json").stat().st_mtime_ns
    assert default_tiny_model_dir(cache) == results[0]  # reused, not rebuilt
    assert (results[0] / "config.json").stat().st_mtime_ns == stamp
