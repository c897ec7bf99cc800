"""Images through the disaggregated path: `glmserve up` (1 prefill + 2 decode) on the tiny glm4v_moe model,
with the official `openai` client sending `data:` URLs. The router preprocesses, the decode worker forwards
the patches, the prefill worker encodes them and returns the M-RoPE offset with the first token; greedy
32 tokens equal transformers' generate with the same images. A repeated image hits the prefix cache, a
bad image is an OpenAI-style 400."""

from __future__ import annotations

import base64
import io

import openai
import pytest
import torch

from tests.engine.vl_reference import hf_inputs, load_hf_vl, make_vl_model, random_image
from tests.serving.deployment import Deployment

N = 32


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    model_dir = make_vl_model(tmp_path_factory.mktemp("images_up") / "model", seed=12)
    with Deployment(model_dir, prefill=1, decode=2,
                    extra_args=("--dtype", "float32", "--num-kv-blocks", "128", "--no-progress")) as d:
        client = openai.OpenAI(base_url=d.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
        yield client, client.models.list().data[0].id, model_dir


def _chat(client, model, images, text):
    parts = [{"type": "text", "text": text}]
    for im in images:
        parts += [{"type": "image_url", "image_url": {"url": _data_url(im)}}, {"type": "text", "text": " and "}]
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": parts}], max_tokens=N, temperature=0,
        extra_body={"min_tokens": N, "return_token_ids": True})


def test_greedy_equals_transformers_for_several_requests(up):
    client, model, model_dir = up
    hf = load_hf_vl(model_dir)
    cases = [([random_image(40, 56, seed=1), random_image(72, 48, seed=2)], "Compare "),
             ([random_image(56, 56, seed=3)], "Describe "),
             ([random_image(32, 80, seed=4)], "What is ")]
    for images, text in cases:  # several requests: both decode workers serve some
        resp = _chat(client, model, images, text)
        ids = resp.model_extra["prompt_token_ids"]
        inputs = hf_inputs(model_dir, ids, images)
        with torch.no_grad():
            ref = hf.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=N,
                              min_new_tokens=N, do_sample=False)
        assert resp.choices[0].model_extra["token_ids"] == ref[0, len(ids):].tolist(), text


def test_repeated_image_hits_the_prefix_cache(up):
    client, model, _ = up
    img = random_image(64, 48, seed=7)
    first = _chat(client, model, [img], "Again: ")
    second = _chat(client, model, [img], "Again: ")
    other = _chat(client, model, [random_image(64, 48, seed=8)], "Again: ")
    assert second.choices[0].model_extra["token_ids"] == first.choices[0].model_extra["token_ids"]
    cached = second.usage.prompt_tokens_details.cached_tokens
    image_start = first.model_extra["prompt_token_ids"].index(998)
    assert cached > image_start  # the image's blocks were reused
    assert other.usage.prompt_tokens_details is None or other.usage.prompt_tokens_details.cached_tokens <= image_start


def test_bad_image_is_a_400(up):
    client, model, _ = up
    bad = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()
    with pytest.raises(openai.BadRequestError, match="cannot decode"):
        client.chat.completions.create(model=model, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad}}]}])
