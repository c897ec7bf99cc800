"""Grammar-constrained requests under MTP speculation: they do not draft, their tokens follow the grammar and
equal those without speculation, while unconstrained requests in the same batch still draft."""

from __future__ import annotations

import json

import pytest
import torch

from glmserve.engine.llm import LLM
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.structured_output.spec import GrammarSpec
from tests.structured.schemas import SCHEMAS

jsonschema = pytest.importorskip("jsonschema")


def test_constrained_requests_follow_their_schema_and_match_no_speculation():
    torch.set_num_threads(1)
    schemas = SCHEMAS[:3]
    params = [SamplingParams(temperature=0.0, max_tokens=80, structured_output=GrammarSpec("json", json.dumps(s)))
              for s in schemas] + [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)]
    prompts = ["Some JSON:"] * len(params)
    plain = LLM(model=None, dtype="float32", show_progress=False).generate(prompts, params)
    spec = LLM(model=None, dtype="float32", show_progress=False,
               speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    outs = spec.generate(prompts, params)
    for schema, out in zip(schemas, outs):
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    stats = spec.engine.speculator.stats
    assert 0 < stats.num_draft_tokens <= 2 * 11  # only the unconstrained request drafted
    assert not spec.engine.structured.grammars
