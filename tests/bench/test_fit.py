"""`glmserve bench` fits its default lengths to the server's max_model_len, and fails fast (one line,
before sending anything) when explicit lengths cannot fit or the server cannot be reached."""

from __future__ import annotations

import pytest

from glmserve.bench.fit import BenchSetupError, fit_lengths, server_max_model_len


def test_defaults_shrink_to_fit_a_small_context():
    i, o = fit_lengths(None, None, 512, tokenized=False)
    assert o == 128 and 2 * (i + o) <= 512  # half the context kept as slack for untokenized words
    i, o = fit_lengths(None, None, 512, tokenized=True)
    assert o == 128 and i + o < 512
    assert fit_lengths(None, None, 128_000, tokenized=True) == (1024, 128)  # big context: the defaults
    assert fit_lengths(None, None, None, tokenized=False) == (1024, 128)  # unknown: the defaults


def test_explicit_lengths_that_cannot_fit_fail_fast():
    with pytest.raises(BenchSetupError, match="max_model_len of 512.*--random-input-len"):
        fit_lengths(1024, None, 512, tokenized=True)
    assert fit_lengths(300, 100, 512, tokenized=True) == (300, 100)
    with pytest.raises(BenchSetupError):
        fit_lengths(None, None, 512, tokenized=True, range_ratio=0.5, extra_prompt_len=400)


def test_unreachable_server_fails_fast():
    with pytest.raises(BenchSetupError, match="cannot reach the server"):
        server_max_model_len("http://127.0.0.1:9", "m", timeout=2)


def test_a_server_without_a_models_endpoint_is_not_fitted(fake_server):
    # The fake OpenAI server has no /v1/models: lengths are then not fitted, and nothing fails.
    assert server_max_model_len(fake_server.base_url, "ok") is None
