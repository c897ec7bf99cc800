from __future__ import annotations

import pytest

from tests.bench.fake_openai_server import FakeServer


@pytest.fixture
def fake_server():
    # One per test: the "flaky" behaviour counts requests, so state must start fresh.
    with FakeServer() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from glmserve.engine.tiny_tokenizer import TINY_ASSETS_DIR
    from glmserve.engine.tokenizer import Tokenizer

    return Tokenizer(TINY_ASSETS_DIR)
