"""`glmserve serve --speculative-algorithm mtp` driven by the official `openai` client: greedy tokens,
streamed or not, equal the offline engine's without speculation."""

from __future__ import annotations

import time

import openai
import pytest

from glmserve import LLM, SamplingParams
from glmserve.engine.tiny_model import build_tiny_model
from glmserve.local_ports import free_port
from tests.serving.serve_process import ServeProcess


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = build_tiny_model("glm4_moe_lite", tmp_path_factory.mktemp("serve_mtp") / "model", seed=5)
    port = free_port()
    args = ["--model", str(model_dir), "--port", str(port), "--dtype", "float32", "--num-kv-blocks", "64",
            "--no-progress", "--speculative-algorithm", "mtp", "--speculative-num-steps", "3"]
    with ServeProcess(args, port) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        yield client, client.models.list().data[0].id, LLM(str(model_dir), dtype="float32", show_progress=False)


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_tokens_with_mtp_equal_the_offline_engine_without_it(served, stream):
    client, model, reference = served
    prompt = list(range(30, 57))
    want = reference.generate([{"prompt_token_ids": prompt}],
                              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    kw = dict(model=model, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    else:
        text = client.completions.create(**kw).choices[0].text
    assert text == want.text and text


def test_spec_decode_counters_are_exported(served):
    from prometheus_client.parser import text_string_to_metric_families

    client, model, _ = served
    client.completions.create(model=model, prompt=list(range(60, 70)), max_tokens=8, temperature=0,
                              extra_body={"ignore_eos": True})
    base = str(client.base_url).removesuffix("/v1/").removesuffix("/v1")
    import urllib.request

    deadline = time.monotonic() + 10
    while True:  # the exporter refreshes at most every 50 ms: poll briefly for the final step's counts
        text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
        samples = {(s.name, s.labels.get("position")): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        if samples.get(("glmserve:spec_decode_num_draft_tokens_total", None), 0) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    drafts = samples[("glmserve:spec_decode_num_drafts_total", None)]
    draft_tokens = samples[("glmserve:spec_decode_num_draft_tokens_total", None)]
    accepted = samples[("glmserve:spec_decode_num_accepted_tokens_total", None)]
    # k = 3 drafts per verify step, fewer only near max_tokens; random weights accept few.
    assert drafts > 0 and drafts <= draft_tokens <= 3 * drafts
    assert 0 <= accepted <= draft_tokens
