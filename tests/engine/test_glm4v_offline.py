"""Images through the offline API and the engine's caches, on the tiny glm4v_moe model (CPU, fp32).

- `llm.generate({"prompt", "multi_modal_data": {"image": [...]}})`: greedy 32 tokens equal to transformers'
  generate on the same text (tokenized by transformers) and images (preprocessed by transformers);
- `llm.chat` with `image_url` data: URLs gives the same tokens as generate;
- prefix cache: same text with a different image of the same size hits only the blocks before the image;
  the same image again hits the image's blocks too; the encoder cache's hit counter moves for a repeated
  image that the prefix cache does not cover;
- refusals: video data, images for a text model, placeholders that do not match the images, bad URLs.
"""

from __future__ import annotations

import base64
import io

import pytest
import torch

from glmserve import LLM, SamplingParams
from glmserve.engine.media import MediaError
from tests.engine.vl_reference import IMAGE, hf_inputs, load_hf_vl, make_vl_model, random_image

PROMPT = ("[gMASK]<sop><|user|>Look at this <|begin_of_image|><|image|><|end_of_image|> and at "
          "<|begin_of_image|><|image|><|end_of_image|> then say what differs.<|assistant|>")
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_vl_model(tmp_path_factory.mktemp("glm4v_offline"), seed=8)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), dtype="float32", device="cpu", block_size=4, show_progress=False)


def _images():
    return [random_image(40, 56, seed=21), random_image(72, 48, seed=22)]


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_generate_with_images_matches_transformers(llm, model_dir):
    from transformers import AutoTokenizer

    images = _images()
    out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": images}}, GREEDY)[0]
    # transformers' side: its tokenizer, its image processor, the placeholders widened as its processor does.
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    grids = hf_inputs(model_dir, [IMAGE], images)["image_grid_thw"]
    text = PROMPT
    for g in grids.tolist():
        text = text.replace("<|image|>", "<|placeholder|>" * (g[0] * g[1] * g[2] // 4), 1)
    ids = tok(text.replace("<|placeholder|>", "<|image|>"))["input_ids"]
    assert out.prompt_token_ids == ids
    hf = load_hf_vl(model_dir)
    inputs = hf_inputs(model_dir, ids, images)
    with torch.no_grad():
        ref = hf.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=32,
                          min_new_tokens=32, do_sample=False)
    assert out.outputs[0].token_ids == ref[0, len(ids):].tolist()


def test_chat_with_data_urls_equals_generate(llm):
    images = _images()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Look at this "},
        {"type": "image_url", "image_url": {"url": _data_url(images[0])}},
        {"type": "text", "text": " and at "},
        {"type": "image_url", "image_url": {"url": _data_url(images[1])}},
        {"type": "text", "text": " then say what differs."},
    ]}]
    chat = llm.chat(messages, GREEDY)[0]
    gen = llm.generate({"prompt": PROMPT + "<think>", "multi_modal_data": {"image": images}}, GREEDY)[0]
    assert chat.prompt_token_ids == gen.prompt_token_ids
    assert chat.outputs[0].token_ids == gen.outputs[0].token_ids


def test_prefix_cache_keys_on_image_content(llm):
    prompt = "[gMASK]<sop><|user|>one two three four five six <|begin_of_image|><|image|><|end_of_image|> seven<|assistant|>"
    params = SamplingParams(temperature=0.0, max_tokens=4)
    a, b = random_image(48, 48, seed=31), random_image(48, 48, seed=32)  # same size: same token ids
    first = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [a]}}, params)[0]
    other = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [b]}}, params)[0]
    again = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [a]}}, params)[0]
    assert first.prompt_token_ids == other.prompt_token_ids
    image_start = first.prompt_token_ids.index(IMAGE)
    n = len(first.prompt_token_ids)
    assert other.num_cached_tokens <= image_start  # only the text blocks before the image are shared
    assert again.num_cached_tokens >= (n - 1) // 4 * 4 - 4 > image_start  # the image's blocks are reused
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_encoder_cache_hits_on_a_repeated_image(llm):
    cache = llm.engine.runner.mm.cache
    img = random_image(56, 40, seed=41)
    params = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate({"prompt": "[gMASK]<sop><|user|>a <|begin_of_image|><|image|><|end_of_image|><|assistant|>",
                  "multi_modal_data": {"image": img}}, params)
    hits = cache.hits
    encoded = llm.engine.runner.mm.num_images_encoded
    # Different text first: no prefix-cache hit on the image's blocks, so its tokens run again.
    llm.generate({"prompt": "[gMASK]<sop><|user|>bb cc dd <|begin_of_image|><|image|><|end_of_image|><|assistant|>",
                  "multi_modal_data": {"image": img}}, params)
    assert cache.hits == hits + 1
    assert llm.engine.runner.mm.num_images_encoded == encoded  # not encoded again


def test_refusals(llm, tmp_path):
    img = random_image(40, 40, seed=1)
    with pytest.raises(ValueError, match="images only"):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": [img]}})
    with pytest.raises(ValueError, match="placeholder"):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": [img]}})  # 2 placeholders, 1 image
    with pytest.raises(MediaError, match="decode"):
        llm.chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()}}]}])
    with pytest.raises(MediaError, match="data: URLs"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.invalid/a.png"}}]}])
    with pytest.raises(MediaError, match="video_url"):
        llm.chat([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:,"}}]}])
    assert not llm.engine.has_unfinished()


def test_text_model_refuses_images(tmp_path):
    text_llm = LLM(None, dtype="float32", device="cpu", show_progress=False, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="takes no images"):
        text_llm.generate({"prompt": "hi <|image|>", "multi_modal_data": {"image": [random_image(30, 30, seed=2)]}})


def test_preempted_image_requests_recompute_the_same_tokens(model_dir, llm):
    """Too few KV blocks for two image prompts at once: one is preempted and recomputed (its image encoded
    again or taken from the encoder cache) and both still give the tokens they give alone."""
    params = SamplingParams(temperature=0.0, max_tokens=24, min_tokens=24)
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"image": _images()}},
               {"prompt": PROMPT.replace("Look", "Stare"),
                "multi_modal_data": {"image": [random_image(48, 48, seed=51), random_image(40, 64, seed=52)]}}]
    alone = [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]
    lengths = [len(o.prompt_token_ids) for o in llm.generate(prompts, SamplingParams(max_tokens=1))]
    # Both prompts fit, their 24 output tokens do not: decoding must preempt one.
    blocks = sum(-(-(n + 1) // 4) for n in lengths) + 3
    tight = LLM(str(model_dir), dtype="float32", device="cpu", block_size=4, num_kv_blocks=blocks,
                enable_prefix_caching=False, show_progress=False)
    together = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert together == alone
