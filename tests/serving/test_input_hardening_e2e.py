"""Bad input against a running `glmserve up` gets a clear OpenAI-style 4xx naming the offending param,
never a 500, a hang or a cut-off stream; /openapi.json describes every request body and response, and a
bounded schemathesis fuzz run against it finds no 5xx, no hang and only OpenAI-shaped errors."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import requests

from glmserve.engine.tiny_model import build_tiny_model
from glmserve.router.input_limits import MAX_BODY_BYTES
from tests.serving.deployment import Deployment

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    model = build_tiny_model("glm4_moe", tmp_path_factory.mktemp("harden") / "model", seed=2)
    # A short context keeps every fuzzed generation short.
    with Deployment(model, prefill=1, decode=1, extra_args=("--dtype", "float32", "--max-model-len", "96",
                                                            "--request-timeout", "60")) as d:
        yield d


def _post(dep, path, body=None, content=None, timeout=30):
    if content is None:
        content = json.dumps(body).encode()
    return httpx.post(dep.base_url + path, content=content, headers={"content-type": "application/json"},
                      timeout=timeout)


def _assert_openai_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body, param", [
    ({"seed": 2 ** 70}, "seed"),
    ({"seed": -(2 ** 63) - 1}, "seed"),
    ({"n": 129}, "n"),
    ({"n": 0}, "n"),
    ({"top_k": 2 ** 40}, "top_k"),
    ({"stop_token_ids": [2 ** 40]}, "stop_token_ids.0"),
    ({"max_tokens": 2 ** 33}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_p": 2.0}, "top_p"),
    ({"temperature": -1}, "temperature"),
])
def test_out_of_range_fields_are_400_naming_the_param(dep, body, param, stream):
    _assert_openai_error(_post(dep, CHAT, {"messages": HI, "max_tokens": 2, **body, "stream": stream}), 400, param)


def test_extreme_but_valid_seeds_work(dep):
    client = openai.OpenAI(base_url=dep.base_url + "/v1", api_key="none", max_retries=0)
    for seed in (-(2 ** 63), 2 ** 63 - 1):  # n=2 gives the second choice seed + 1, wrapped within int64
        r = client.chat.completions.create(model="model", messages=HI, max_tokens=2, seed=seed, n=2, temperature=1)
        assert len(r.choices) == 2 and all(c.finish_reason for c in r.choices)


def test_lone_surrogate_is_400(dep):
    raw = b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
    _assert_openai_error(_post(dep, CHAT, content=raw), 400, "messages.0.content")
    raw = b'{"prompt": "\\udfff", "max_tokens": 2}'
    _assert_openai_error(_post(dep, "/v1/completions", content=raw), 400, "prompt")
    _assert_openai_error(_post(dep, CHAT, content=b'{"messages": "\xff\xfe"}'), 400)  # not UTF-8 at all


@pytest.mark.parametrize("depth", [100_000, 70])
def test_over_deep_json_is_400(dep, depth):
    nested = "[" * depth + "]" * depth
    raw = ('{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"a": ' + nested + "}}").encode()
    err = _assert_openai_error(_post(dep, CHAT, content=raw), 400)
    assert "nested deeper" in err["message"]


def test_body_over_the_cap_is_413(dep):
    raw = b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    _assert_openai_error(_post(dep, "/v1/completions", content=raw, timeout=120), 413)


def test_wrong_method_is_405_with_allow(dep):
    r = httpx.get(dep.base_url + CHAT, timeout=10)
    _assert_openai_error(r, 405)
    assert r.headers["allow"] == "POST"


def test_lightllm_fields_are_range_checked(dep):
    _assert_openai_error(_post(dep, "/generate", {"inputs": "x", "parameters": {"seed": 2 ** 64}}), 400,
                         "parameters.seed")
    _assert_openai_error(_post(dep, "/generate", {"inputs": "x", "parameters": {"n": 1000}}), 400, "parameters.n")


def test_router_ready_endpoint(dep):
    r = httpx.get(dep.base_url + "/ready", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_openapi_describes_every_request_body_and_response(dep):
    doc = httpx.get(dep.base_url + "/openapi.json", timeout=10).json()
    schemas = doc["components"]["schemas"]
    for path, request, response in [(CHAT, "ChatCompletionRequest", "ChatCompletionResponse"),
                                     ("/v1/completions", "CompletionRequest", "CompletionResponse"),
                                     ("/generate", "GenerateRequest", "GenerateResponse"),
                                     ("/generate_stream", "GenerateRequest", None)]:
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + request)
        ok = op["responses"]["200"]["content"]
        if response:
            assert ok["application/json"]["schema"]["$ref"].endswith("/" + response)
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert request in schemas
    assert schemas["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 128
    assert "/v1/models" in doc["paths"] and "ModelList" in schemas
    # The document itself is valid OpenAPI (schemathesis loads and resolves every reference).
    import schemathesis

    schema = schemathesis.openapi.from_url(dep.base_url + "/openapi.json")
    assert {op.path for op in (r.ok() for r in schema.get_all_operations())} >= {CHAT, "/v1/completions", "/generate"}


FUZZ_EXAMPLES = 60  # per operation; the ones with bodies reach it, /health & co. run out of distinct cases


def test_fuzz_openapi_no_5xx_no_hang_openai_errors(dep):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(dep.base_url + "/openapi.json")
    counts = {"cases": 0, "2xx": 0, "4xx": 0}
    slowest = [0.0]
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def fuzz(case):
            start = time.monotonic()
            # Sent with requests ourselves: schemathesis' own call stops reading a stream after some events.
            kwargs = case.as_transport_kwargs(base_url=dep.base_url)
            response = requests.request(**kwargs, timeout=60)
            slowest[0] = max(slowest[0], time.monotonic() - start)
            counts["cases"] += 1
            status = response.status_code
            assert status < 500, f"{case.method} {case.path} {case.body!r:.300} -> {status} {response.text[:300]}"
            if status >= 400:
                counts["4xx"] += 1
                err = response.json()["error"]
                assert isinstance(err["message"], str) and err["message"] and "type" in err
                if not op.path.startswith("/v1/messages"):  # Anthropic's error shape has no param
                    assert "param" in err, (op.path, err)
                return
            counts["2xx"] += 1
            if "text/event-stream" in response.headers.get("content-type", ""):
                events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
                assert events, response.text[:300]
                if op.path != "/generate_stream":
                    assert events[-1] == "[DONE]", f"{case.body!r:.800} {response.text[-300:]}"  # never cut off
                for e in events[:-1]:
                    assert "error" not in json.loads(e), e
            else:
                case.validate_response(response, checks=[schemathesis.checks.not_a_server_error]
                                       + [c for c in _conformance()])

        fuzz()
    print(f"fuzz: {counts} slowest {slowest[0]:.1f}s")
    assert counts["cases"] >= 200 and counts["2xx"] > 20 and counts["4xx"] > 20, counts


def _conformance():
    from schemathesis.specs.openapi import checks

    return [checks.response_schema_conformance]


def test_bench_defaults_fit_the_servers_context(dep, tmp_path):
    """`glmserve bench` with its default lengths (1024 + 128 tokens) against this 96-token server."""
    import argparse

    from glmserve.bench import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--base-url", dep.base_url, "--model", "model", "--num-prompts", "3",
                              "--disable-tqdm", "--result-file", str(tmp_path / "b.json")])
    assert cli.run(args) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["completed"] == 3 and result.get("failed", 0) == 0, result
