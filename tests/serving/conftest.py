from __future__ import annotations

import pytest

from tests.serving.trained_model import train_tool_model


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    """The tiny checkpoint trained on tests/serving/trained_model.CONVERSATIONS (trained once per session)."""
    return train_tool_model(tmp_path_factory.mktemp("tool-model"))
