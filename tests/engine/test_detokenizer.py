"""Incremental detokenizer (deltas concatenate to the full decode, never half a character) and stop strings
(never emit any part of one, whatever the delta boundaries)."""

from __future__ import annotations

import itertools
import random

import pytest
from glmserve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from glmserve.engine.tiny_tokenizer import TINY_ASSETS_DIR
from glmserve.engine.tokenizer import Tokenizer

PIECES = ["hello", " world", "的", "你好", "é", "ß", "😀", "🚀", "👩‍💻", " 42", "\n", "<think>", "</think>",
          "<tool_call>", "<|user|>", "<|assistant|>", "<|endoftext|>", "Ωμέγα", "ありがとう", "{\"k\": 1}"]
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TINY_ASSETS_DIR)


@pytest.fixture(scope="module")
def byte_ids(tok) -> dict[int, int]:
    """Token id of every single byte, to split characters across tokens on purpose."""
    # Byte-level BPE spells printable Latin-1 bytes as themselves and the rest as chr(256 + n), in order.
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(256, 512))
    ids = {b: tok.token_to_id(chr(b) if b in printable else chr(next(others))) for b in range(256)}
    assert None not in ids.values()
    assert tok.decode([ids[b] for b in "你".encode()]) == "你"
    return ids


def _byte_split(tok, byte_ids, text: str, rng: random.Random) -> list[int]:
    """Encode text, but spell some non-special pieces byte by byte (splitting multi-byte characters)."""
    out: list[int] = []
    for piece in text.split("\x00"):
        ids = tok.encode(piece)
        if len(ids) == 1 and tok.id_to_token(ids[0]) == piece:
            out += ids  # an added token
        elif rng.random() < 0.6:
            out += [byte_ids[b] for b in piece.encode("utf-8")]
        else:
            out += ids
    return out


def _stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        deltas.append(detok.push(ids[i:i + n]))
        i += n
    return deltas


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_valid_sequences(tok, byte_ids, skip_special_tokens):
    rng = random.Random(1234)
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=True)
    for _ in range(300):
        text = "\x00".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))
        ids = _byte_split(tok, byte_ids, text, rng)
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
        deltas = _stream(detok, ids, rng)
        deltas.append(detok.flush())
        expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == expected
        assert FFFD not in expected and not any(FFFD in d for d in deltas)
        assert detok.output_ids == ids


def test_random_token_ids_any_bytes(tok):
    # Arbitrary ids can form invalid UTF-8; the stream must still add up to the full decode.
    rng = random.Random(99)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 20))]
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 8))]
        detok = IncrementalDetokenizer(tok, prompt)
        deltas = _stream(detok, ids, rng) + [detok.flush()]
        assert "".join(deltas) == tok.decode(ids)


def test_character_released_when_complete(tok, byte_ids):
    detok = IncrementalDetokenizer(tok, tok.encode("[gMASK]<sop><|user|>x<|assistant|>"))
    first, second, third = (byte_ids[b] for b in "你".encode())
    assert detok.push([byte_ids[ord("a")], first]) == "a"
    assert detok.push([second]) == ""
    assert detok.push([third]) == "你"
    assert detok.push([]) == ""
    assert detok.flush() == ""


def test_unfinished_character_appears_on_flush(tok, byte_ids):
    detok = IncrementalDetokenizer(tok, [])
    assert detok.push([byte_ids[0xE4], byte_ids[0xBD]]) == ""
    assert detok.flush() == tok.decode([byte_ids[0xE4], byte_ids[0xBD]]) == FFFD


def test_prompt_ending_mid_character_is_not_completed_by_output(tok, byte_ids):
    prompt = tok.encode("hi") + [byte_ids[0xE4]]
    detok = IncrementalDetokenizer(tok, prompt)
    out = [byte_ids[0xBD], byte_ids[0xA0]] + tok.encode("ok")
    text = "".join(detok.push([i]) for i in out) + detok.flush()
    assert text == tok.decode(out)


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("a<|user|>b<think>c")
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(kept.push([i]) for i in ids) == "a<|user|>b<think>c"
    skipped = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join(skipped.push([i]) for i in ids) == "ab<think>c"


# -- stop strings -------------------------------------------------------------------------------------
def _feed_split(matcher: StopStringMatcher, text: str, cuts: tuple[int, ...]):
    chunks = [text[a:b] for a, b in zip((0,) + cuts, cuts + (len(text),))]
    emitted, result = [], None
    for chunk in chunks:
        result = matcher.feed(chunk)
        emitted.append(result.text)
        if result.stopped:
            break
    if not result.stopped:
        emitted.append(matcher.flush())
    return emitted, result


def _all_cuts(text: str, max_cuts: int = 2):
    positions = range(1, len(text))
    for k in range(max_cuts + 1):
        yield from itertools.combinations(positions, k)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_at_every_position(include):
    text, stop = "Hello wo STOP rld", "STOP"
    want = "Hello wo STOP" if include else "Hello wo "
    for cuts in _all_cuts(text):
        emitted, result = _feed_split(StopStringMatcher([stop, "never"], include), text, cuts)
        assert "".join(emitted) == want, cuts
        assert result.stopped and result.matched_stop == stop
        if not include:
            assert not any(c in chunk for chunk in emitted for c in "STOP"), cuts


def test_partial_stop_is_held_back_then_released():
    m = StopStringMatcher(["</answer>"])
    assert m.feed("value </ans") == ("value ", False, None)
    assert m.feed("wer") == ("", False, None)
    assert m.feed("s") == ("</answers", False, None)  # diverged: it was text after all
    assert m.feed(" end </") == (" end ", False, None)
    assert m.flush() == "</"


def test_first_completed_stop_wins_for_any_split():
    # "bc" completes before "abcd"; at equal ends the earlier start ("xab" over "ab") wins.
    for text, stops, want, matched in [("xabcdy", ["abcd", "bc"], "xa", "bc"),
                                       ("zzxab", ["ab", "xab"], "zz", "xab")]:
        for cuts in _all_cuts(text):
            emitted, result = _feed_split(StopStringMatcher(stops), text, cuts)
            assert ("".join(emitted), result.matched_stop) == (want, matched), cuts


def test_random_streams_against_reference():
    rng = random.Random(7)
    for _ in range(500):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 14)))
        hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        cuts = tuple(sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 5))))) if text else ()
        emitted, result = _feed_split(StopStringMatcher(stops), text, cuts)
        if hits:
            _, start, stop = min(hits)
            assert ("".join(emitted), result.stopped) == (text[:start], True)
            assert text[start:].startswith(result.matched_stop) and len(result.matched_stop) == len(stop)
        else:
            assert ("".join(emitted), result.stopped) == (text, False)


def test_after_stop_nothing_more():
    m = StopStringMatcher(["."])
    assert m.feed("one. two") == ("one", True, ".")
    assert m.feed("three") == ("", True, ".")
    assert m.flush() == ""


def test_empty_stop_rejected():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])
