"""Prompt generators: lengths, determinism by seed, shared prefixes, ShareGPT parsing."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from glmserve.bench.datasets import prefix_repetition_requests, random_requests, sharegpt_requests


def test_random_words_have_requested_lengths_without_tokenizer():
    reqs = random_requests(30, input_len=40, output_len=7, range_ratio=0.0, seed=3)
    assert len(reqs) == 30
    assert all(len(r.prompt.split()) == 40 and r.output_len == 7 and r.prompt_len is None for r in reqs)


def test_random_range_ratio_bounds_and_spread():
    reqs = random_requests(200, input_len=100, output_len=20, range_ratio=0.5, seed=1)
    in_lens = [len(r.prompt.split()) for r in reqs]
    out_lens = [r.output_len for r in reqs]
    assert min(in_lens) >= 50 and max(in_lens) <= 150
    assert min(out_lens) >= 10 and max(out_lens) <= 30
    assert len(set(in_lens)) > 20  # actually spread, not a constant


def test_random_is_deterministic_by_seed():
    a = random_requests(10, 30, 5, 0.3, seed=7)
    b = random_requests(10, 30, 5, 0.3, seed=7)
    c = random_requests(10, 30, 5, 0.3, seed=8)
    assert a == b
    assert a != c


def test_random_rejects_bad_range_ratio():
    with pytest.raises(ValueError):
        random_requests(1, 10, 10, 1.0, seed=0)


@pytest.mark.parametrize("length", [1, 7, 64, 300])
def test_random_token_prompts_have_exact_token_length(tiny_tokenizer, length):
    reqs = random_requests(8, input_len=length, output_len=4, range_ratio=0.0, seed=length,
                           tokenizer=tiny_tokenizer)
    for r in reqs:
        assert r.prompt_len == length
        assert len(tiny_tokenizer.encode(r.prompt)) == length  # prompt_len is a real measurement


def test_prefix_repetition_shares_prefixes():
    reqs = prefix_repetition_requests(12, prefix_len=20, num_prefixes=3, suffix_len=5, output_len=9, seed=0)
    prefixes = Counter(" ".join(r.prompt.split()[:20]) for r in reqs)
    assert len(prefixes) == 3 and sorted(prefixes.values()) == [4, 4, 4]
    suffixes = {" ".join(r.prompt.split()[20:]) for r in reqs}
    assert len(suffixes) == 12  # each prompt's tail is its own
    assert all(len(r.prompt.split()) == 25 and r.output_len == 9 for r in reqs)
    order = [" ".join(r.prompt.split()[:20]) for r in reqs]
    assert any(order[i] != order[i + 3] for i in range(9))  # shuffled: not the round-robin build order
    assert reqs == prefix_repetition_requests(12, 20, 3, 5, 9, seed=0)


def test_prefix_repetition_token_prefixes_identical(tiny_tokenizer):
    reqs = prefix_repetition_requests(9, prefix_len=32, num_prefixes=3, suffix_len=8, output_len=4, seed=2,
                                      tokenizer=tiny_tokenizer)
    heads = Counter(tuple(tiny_tokenizer.encode(r.prompt)[:32]) for r in reqs)
    assert sorted(heads.values()) == [3, 3, 3]  # a server's prefix cache sees the same 32 token ids
    assert all(r.prompt_len >= 40 for r in reqs)


def _write(tmp_path, data):
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_takes_first_exchange_and_reply_length(tmp_path):
    path = _write(tmp_path, [
        {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "a b c d e"}]},
        {"conversations": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why"},
                           {"role": "assistant", "content": "because so"}]},
        {"conversations": [{"from": "gpt", "value": "orphan reply"}]},  # no user turn: skipped
        {"no_conversations": True},
    ])
    reqs = sharegpt_requests(path, num_prompts=2, seed=0)
    assert {(r.prompt, r.output_len) for r in reqs} == {("hello there", 5), ("why", 2)}
    fixed = sharegpt_requests(path, num_prompts=5, seed=0, output_len=11)
    assert len(fixed) == 5 and all(r.output_len == 11 for r in fixed)  # reused to reach the count


def test_sharegpt_counts_tokens_with_tokenizer(tmp_path, tiny_tokenizer):
    path = _write(tmp_path, [{"conversations": [{"from": "human", "value": "the model server cache"},
                                                {"from": "gpt", "value": "hello world please"}]}])
    (req,) = sharegpt_requests(path, 1, seed=0, tokenizer=tiny_tokenizer)
    assert req.prompt_len == len(tiny_tokenizer.encode("the model server cache"))
    assert req.output_len == len(tiny_tokenizer.encode("hello world please"))


def test_sharegpt_without_usable_conversations_fails(tmp_path):
    with pytest.raises(ValueError, match="no conversation"):
        sharegpt_requests(_write(tmp_path, [{"conversations": []}]), 1, seed=0)
