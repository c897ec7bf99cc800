"""Structured outputs end to end: `glmserve up` (1 prefill + 1 decode) on the random tiny model, queried
with the official openai client. The model's free output is noise, so every valid JSON document, regex
match or choice below is the grammar's doing, across the split (the first token is sampled by the
prefill worker under the grammar, the rest by the decode worker continuing its matcher)."""

from __future__ import annotations

import json
import re

import pytest

from glmserve.engine.tiny_model import build_tiny_model
from tests.serving.deployment import Deployment
from tests.structured.schemas import SCHEMAS

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MAX_TOKENS = 96
MODEL = ""  # the served name, set by the client fixture
MESSAGES = [{"role": "user", "content": "Give me JSON."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = build_tiny_model("glm4_moe", tmp_path_factory.mktemp("structured") / "model", seed=5)
    args = ("--dtype", "float32", "--tool-call-parser", "glm47")
    with Deployment(model_dir, prefill=1, decode=1, extra_args=args, env={"OMP_NUM_THREADS": "1"}) as dep:
        yield dep


@pytest.fixture(scope="module")
def client(served):
    c = openai.OpenAI(base_url=served.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    global MODEL
    MODEL = c.models.list().data[0].id
    return c


def _chat(client, stream: bool, **kwargs) -> list[tuple[str, str]]:
    """(content, finish_reason) per choice."""
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 1.0, **kwargs}
    if not stream:
        r = client.chat.completions.create(**kwargs)
        return [(c.message.content or "", c.finish_reason) for c in r.choices]
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return [(texts[i], reasons[i]) for i in sorted(texts)]


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schema_outputs_validate(client, index):
    schema = SCHEMAS[index]
    rf = {"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema, "strict": True}}
    for stream in (False, True):
        choices = _chat(client, stream, response_format=rf, n=2, seed=index)
        assert len(choices) == 2
        for text, reason in choices:
            assert reason == "stop", (stream, text)
            jsonschema.validate(json.loads(text), schema)


def test_regex_and_choice(client):
    pattern = r"[a-c]{2}-\d{3}"
    for stream in (False, True):
        for text, _ in _chat(client, stream, n=2, seed=1, extra_body={"structured_outputs": {"regex": pattern}}):
            assert re.fullmatch(pattern, text), text
        for text, _ in _chat(client, stream, n=2, seed=2, extra_body={"guided_choice": ["alpha", "beta gamma"]}):
            assert text in ("alpha", "beta gamma")


def test_completions_guided_json_and_grammar(client):
    schema = SCHEMAS[10]
    r = client.completions.create(model=MODEL, prompt="data:", max_tokens=MAX_TOKENS, seed=3,
                                  extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    ebnf = 'root ::= "(" [0-9] ("+" [0-9])* ")"'
    r = client.completions.create(model=MODEL, prompt="sum:", max_tokens=40, seed=4,
                                  extra_body={"structured_outputs": {"grammar": ebnf}})
    assert re.fullmatch(r"\(\d(\+\d)*\)", r.choices[0].text), r.choices[0].text


def test_bad_constraints_are_400s(client):
    bad = [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
        {"extra_body": {"structured_outputs": {"regex": "("}}},
        {"extra_body": {"guided_regex": "a+", "guided_choice": ["a"]}},
        {"response_format": {"type": "xml"}},
        {"extra_body": {"best_of": 3}},
        {"logit_bias": {"999999": 5}},
        {"logit_bias": {"3": 500}},
    ]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError):
            _chat(client, False, **kwargs)


def test_logit_bias_allowed_token_ids_and_bad_words(client, served):
    from glmserve.engine.tokenizer import Tokenizer
    tok = Tokenizer(served.model_dir)
    target = tok.encode(" hello")[0]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=1.0, seed=1,
                                       logit_bias={str(target): 100}, extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == [target] * 5 or set(r.choices[0].token_ids) == {target}
    allowed = tok.encode(" yes no maybe")
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=2,
                                       extra_body={"allowed_token_ids": allowed, "return_token_ids": True})
    assert set(r.choices[0].token_ids) <= set(allowed)
    # Greedy output, then the same request with its first generated word banned.
    base = client.completions.create(model=MODEL, prompt="data:", max_tokens=6, temperature=0,
                                     extra_body={"return_token_ids": True})
    first = base.choices[0].token_ids[0]
    word = tok.decode([first])
    again = client.completions.create(model=MODEL, prompt="data:", max_tokens=6, temperature=0,
                                      extra_body={"return_token_ids": True, "bad_words": [word]})
    assert again.choices[0].token_ids[0] != first


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_grammar_metrics(client, served):
    """Runs after the tests above: the router counted their grammars, the workers timed their compiles."""
    import urllib.request

    def scrape(url: str) -> str:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    router = scrape(served.base_url + "/metrics")
    assert _metric(router, "glmserve:structured_output_requests_total", kind="json") >= 40
    assert _metric(router, "glmserve:structured_output_requests_total", kind="regex") >= 1
    for name, (_, ready_url, _) in served.processes.items():
        if name != "router":
            worker = scrape(ready_url.rsplit("/", 1)[0] + "/metrics")
            assert _metric(worker, "glmserve:grammar_compile_seconds_count") >= 20, name
