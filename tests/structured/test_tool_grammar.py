"""The tool-call structural tags (router/tool_grammar.py) on the engine: they compile, and the random tiny
model's text under them parses into calls whose arguments satisfy the schemas (strict tools under
"auto" included: a logit bias on `<tool_call>` makes the model start a call, the grammar does the rest)."""

from __future__ import annotations

import json

import pytest
import torch

from glmserve.engine.llm import LLM
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.structured_output.spec import GrammarSpec
from glmserve.engine.tokenizer import Tokenizer
from glmserve.router.errors import APIError
from glmserve.router.tool_grammar import tool_call_structural_tag
from glmserve.router.tool_parsers import get_tool_parser
from tests.structured.test_tool_choice_e2e import SCHEMAS, TOOLS

jsonschema = pytest.importorskip("jsonschema")
STRICT_TOOLS = [{"type": "function", "function": {**t["function"], "strict": True}} for t in TOOLS]


@pytest.fixture(scope="module")
def llm():
    torch.set_num_threads(1)
    return LLM(model=None, dtype="float32", show_progress=False)


def _generate(llm, tag: dict, n: int, bias: dict[int, float] | None = None) -> list[str]:
    spec = GrammarSpec("structural_tag", json.dumps(tag))
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=100, structured_output=spec, logit_bias=bias,
                             skip_special_tokens=False) for s in range(n)]
    return [o.outputs[0].text for o in llm.generate(["Call a tool."] * n, params)]


def _calls(text: str, layout: str) -> list[tuple[str, dict]]:
    parsed = get_tool_parser(layout)(TOOLS, grammar_padding=True).parse(text)
    calls = [(c.name, json.loads(c.arguments_json)) for c in parsed.tool_calls]
    for name, args in calls:
        jsonschema.validate(args, SCHEMAS[name])
    return calls


def test_which_requests_get_a_tool_grammar():
    assert tool_call_structural_tag(TOOLS, "auto", True, "glm47") is None  # free calls, free text
    assert tool_call_structural_tag(TOOLS, "none", False, "glm47") is None
    assert tool_call_structural_tag(TOOLS, "auto", False, "glm47")["format"]["stop_after_first"] is True
    assert tool_call_structural_tag(STRICT_TOOLS, "auto", True, "glm47")["format"]["type"] == "triggered_tags"
    with pytest.raises(APIError, match="needs tools"):
        tool_call_structural_tag([], "required", True, "glm45")


@pytest.mark.parametrize("layout", ["glm45", "glm47"])
def test_required_and_named_calls_parse_and_validate(llm, layout):
    for text in _generate(llm, tool_call_structural_tag(TOOLS, "required", True, layout), 3):
        assert len(_calls(text, layout)) >= 1, text
    for text in _generate(llm, tool_call_structural_tag(TOOLS, "required", False, layout), 3):
        assert len(_calls(text, layout)) == 1, text
    named = {"type": "function", "function": {"name": "get_weather"}}
    for text in _generate(llm, tool_call_structural_tag(TOOLS, named, True, layout), 2):
        assert [n for n, _ in _calls(text, layout)] == ["get_weather"], text


def test_strict_tools_under_auto_constrain_a_started_call(llm):
    start = Tokenizer(llm.engine.loaded.model_dir).token_to_id("<tool_call>")
    tag = tool_call_structural_tag(STRICT_TOOLS, "auto", False, "glm47")
    texts = _generate(llm, tag, 3, bias={start: 100.0})
    for text in texts:
        assert text.startswith("<tool_call>"), text
        assert len(_calls(text, "glm47")) == 1, text
