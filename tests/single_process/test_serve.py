"""`glmserve serve` (router front + engine in one process, glmserve.single_process) driven by the official
`openai` client: greedy tokens equal the offline engine's, logprobs come back, a bad request is a 400."""

from __future__ import annotations


import openai
import pytest

from glmserve import LLM, SamplingParams
from glmserve.engine.tiny_model import build_tiny_model
from glmserve.local_ports import free_port
from tests.serving.serve_process import ServeProcess


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = build_tiny_model("glm4_moe", tmp_path_factory.mktemp("serve") / "model", seed=4)
    port = free_port()
    args = ["--model", str(model_dir), "--port", str(port), "--dtype", "float32", "--num-kv-blocks", "64",
            "--no-progress"]
    with ServeProcess(args, port) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        yield client, client.models.list().data[0].id, LLM(str(model_dir), dtype="float32", show_progress=False)


def test_greedy_tokens_equal_the_offline_engine(served):
    client, model, reference = served
    prompt = list(range(40, 61))
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = resp.choices[0]
    want = reference.generate([{"prompt_token_ids": prompt}],
                              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    assert choice.model_extra["token_ids"] == want
    assert len(choice.logprobs.token_logprobs) == 12 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) >= 1 for top in choice.logprobs.top_logprobs)


def test_an_invalid_token_id_is_a_400(served):
    client, model, _ = served
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=[10**9], max_tokens=2)


def test_unimplemented_engine_flags_are_refused_in_one_line(tmp_path):
    from glmserve.cli import main

    with pytest.raises(SystemExit) as exc:  # before any model is loaded (the directory is empty)
        main(["serve", "--model", str(tmp_path), "--tensor-parallel-size", "2", "--speculative-algorithm", "mtp"])
    assert exc.value.code == "--speculative-algorithm mtp does not support --tensor-parallel-size > 1 yet"
