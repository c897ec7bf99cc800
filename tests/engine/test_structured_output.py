"""Engine-side structured output: grammar specs, the compile cache, matchers (reasoning-aware start,
replay across the prefill/decode split), the masks in a real engine step, and the token constraints
(logit_bias, allowed_token_ids, bad_words) in the sampler."""

from __future__ import annotations

import json

import pytest
import torch

from glmserve.engine.engine import RequestError
from glmserve.engine.llm import LLM
from glmserve.engine.logits_processors import banned_by_bad_words
from glmserve.engine.sampler import Sampler, SamplingRow
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.structured_output.compiler import GrammarCompiler
from glmserve.engine.structured_output.matcher import RequestGrammar
from glmserve.engine.structured_output.spec import GrammarSpec
from glmserve.engine.tiny_tokenizer import TINY_ASSETS_DIR
from glmserve.engine.tokenizer import Tokenizer
from tests.structured.schemas import SCHEMAS

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def llm():
    torch.set_num_threads(1)
    return LLM(model=None, dtype="float32", show_progress=False)


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(TINY_ASSETS_DIR, 1000, [0])


def test_spec_validation():
    with pytest.raises(ValueError, match="kind"):
        GrammarSpec("xml", "x")
    with pytest.raises(ValueError, match="not valid JSON"):
        GrammarSpec("json", "{nope")
    with pytest.raises(ValueError, match="non-empty list"):
        GrammarSpec("choice", "[]")
    assert GrammarSpec("json", "{}", 5).cache_key == GrammarSpec("json", "{}").cache_key


def test_compile_cache_compiles_each_grammar_once(compiler):
    spec = GrammarSpec("regex", r"\d{3}")
    first = compiler.get(spec)
    assert compiler.get(GrammarSpec("regex", r"\d{3}", start_after_token_id=7)) is first
    assert len(compiler.compile_seconds) == 1 and compiler.hits == 1
    with pytest.raises(ValueError, match="could not compile the regex"):
        compiler.get(GrammarSpec("regex", "("))


def _mask(grammar: RequestGrammar) -> torch.Tensor:
    import xgrammar as xgr
    bitmask = xgr.allocate_token_bitmask(1, 1000)
    grammar.fill(bitmask, 0)
    return bitmask[0].clone()


def test_matcher_waits_for_the_end_of_thinking_then_replays(compiler):
    tok = Tokenizer(TINY_ASSETS_DIR)
    end_think = tok.token_to_id("</think>")
    spec = GrammarSpec("choice", json.dumps(["yes", "no"]), start_after_token_id=end_think)
    g = RequestGrammar(spec, compiler.get(spec), [0])
    free = tok.encode(" anything at all")
    for t in free:
        assert not g.active and g.accept(t)
    assert g.accept(end_think) and g.active
    y = tok.encode("y")[0]
    assert g.accept(y)
    # The decode worker's matcher replays the same tokens and lands in the same state (same mask).
    other = RequestGrammar(spec, compiler.get(spec), [0])
    other.replay(free + [end_think, y])
    assert torch.equal(_mask(g), _mask(other))
    with pytest.raises(ValueError, match="does not follow"):
        RequestGrammar(GrammarSpec("choice", json.dumps(["no"])), compiler.get(GrammarSpec("choice", '["no"]')),
                       [0]).replay([y])


def test_engine_output_follows_json_schemas(llm):
    schemas = SCHEMAS[:6]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=80,
                             structured_output=GrammarSpec("json", json.dumps(s))) for i, s in enumerate(schemas)]
    outs = llm.generate(["Some JSON:"] * len(schemas), params)
    for schema, out in zip(schemas, outs):
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    assert not llm.engine.structured.grammars  # finished requests drop their matchers


def test_engine_refuses_a_bad_grammar_and_out_of_vocab_ids(llm):
    with pytest.raises(RequestError, match="could not compile"):
        llm.engine.add_request("bad", [1, 2, 3], SamplingParams(structured_output=GrammarSpec("grammar", "root ::= (")))
    with pytest.raises(RequestError, match="allowed_token_ids"):
        llm.engine.add_request("bad2", [1, 2, 3], SamplingParams(allowed_token_ids=[10**6]))


def test_sampler_applies_logit_bias_allowed_ids_and_bad_words():
    logits = torch.zeros(3, 10)
    logits[:, 0] = 5.0  # token 0 wins unless a constraint says otherwise
    rows = [SamplingRow(SamplingParams(temperature=0, logit_bias={7: 10.0}), [1, 5, 6], 1),
            SamplingRow(SamplingParams(temperature=0, allowed_token_ids=[3, 4]), [1, 5, 6], 1),
            SamplingRow(SamplingParams(temperature=0, bad_words_token_ids=[[6, 0], [9]]), [1, 5, 6], 1)]
    logits[1, 4] = 1.0
    logits[2, 9] = 4.0
    got = [t.token_id for t in Sampler()(logits, rows)]
    assert got[0] == 7 and got[1] == 4
    assert got[2] not in (0, 9)  # [6, 0] completes after the output's 6; [9] is banned anywhere


def test_bad_words_ban_only_completing_tokens():
    assert banned_by_bad_words([[1, 2], [3], [4, 5, 6]], [9, 1]) == [2, 3]
    assert banned_by_bad_words([[4, 5, 6]], [4, 5]) == [6]
    assert banned_by_bad_words([[4, 5, 6]], [5]) == []


def test_params_validate_constraints():
    with pytest.raises(ValueError, match="logit_bias values"):
        SamplingParams(logit_bias={1: 101.0})
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words_token_ids=[[]])
