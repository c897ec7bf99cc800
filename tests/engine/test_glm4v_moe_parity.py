"""glm4v_moe (GLM-4.5V / 4.6V) against transformers' Glm4vMoeForConditionalGeneration on a tiny random
checkpoint, fp32 on CPU: logits within 1e-4 for prompts with one and two images of different sizes and
text before, between and after them, through our ModelRunner with paged KV (shuffled blocks), chunked
prefill that splits an image, and decode after it; greedy generation equal to transformers' generate.
"""

from __future__ import annotations

import pytest
import torch

from glmserve.engine.config import EngineConfig, SchedulerConfig
from glmserve.engine.engine import LLMEngine
from glmserve.engine.sampling_params import SamplingParams
from tests.engine.hf_reference import load_ours, max_abs_diff
from tests.engine.vl_reference import (
    IMAGE, VLRunner, hf_inputs, hf_vl_logits, load_hf_vl, make_vl_model, processed, prompt_ids, random_image,
    text_ids,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    d = make_vl_model(tmp_path_factory.mktemp("glm4v_moe"), seed=5)
    return d, load_hf_vl(d), load_ours(d)


def _two_image_prompt(d):
    pil = [random_image(40, 56, seed=1), random_image(90, 70, seed=2)]  # the second is downscaled
    ims = processed(pil, d)
    ids = prompt_ids([text_ids(5, 1), None, text_ids(4, 2), None, text_ids(6, 3)], ims)
    return pil, ims, ids


def test_config_and_shapes(vl):
    d, hf, ours = vl
    cfg = ours.config
    assert cfg.arch == "glm4v_moe" and cfg.vision is not None
    assert cfg.mrope_section == (2, 3, 3) and cfg.rotary_dim == 16
    assert cfg.vision.image_token_id == IMAGE and cfg.vision.patch_size == 4
    assert cfg.dense_layers[0] and not all(cfg.dense_layers) and cfg.n_group > 1


def test_vision_tower_matches(vl):
    d, hf, ours = vl
    pil = [random_image(40, 56, seed=1), random_image(24, 96, seed=3)]
    inputs = hf_inputs(d, [IMAGE], pil)
    with torch.no_grad():
        ref = hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        got = ours.model.encode_images(inputs["pixel_values"], [tuple(g) for g in inputs["image_grid_thw"].tolist()])
    ref = torch.cat(ref)
    assert ref.std() > 0.1
    assert max_abs_diff(got, ref) < TOL


@pytest.mark.parametrize("case", ["one_image", "two_images"])
def test_prefill_logits(vl, case):
    d, hf, ours = vl
    if case == "one_image":
        pil = [random_image(64, 48, seed=7)]
        ims = processed(pil, d)
        ids = prompt_ids([text_ids(3, 4), None, text_ids(5, 5)], ims)
    else:
        pil, ims, ids = _two_image_prompt(d)
    ref = hf_vl_logits(hf, d, ids, pil)
    run = VLRunner(ours, block_size=4, seed=1)
    req = run.add("a", ids, ims)
    run.step([(req, len(ids))])
    assert ref.std() > 0.1
    assert max_abs_diff(run.sequence_logits("a"), ref) < TOL


def test_chunked_prefill_splits_images_then_decodes(vl):
    d, hf, ours = vl
    pil, ims, ids = _two_image_prompt(d)
    continuation = text_ids(4, 9)
    full = ids + continuation
    ref = hf_vl_logits(hf, d, full, pil)
    run = VLRunner(ours, block_size=4, seed=2)
    req = run.add("a", full, ims)
    req.num_prompt_tokens = len(ids)  # the last 4 tokens play the output: decoded one by one
    mm = req.mm
    first = mm.images[0]
    cut = first.offset + first.num_tokens // 2  # chunk boundaries in the middle of each image
    cut2 = mm.images[1].offset + 21
    assert cut2 < mm.images[1].end
    sizes = [cut, cut2 - cut, len(ids) - cut2] + [1] * len(continuation)
    for n in sizes:
        run.step([(req, n)])
    assert max_abs_diff(run.sequence_logits("a"), ref) < TOL
    # Each image was encoded once although two chunks needed each.
    assert run.runner.mm.num_images_encoded == 2


def test_batch_mixes_text_and_image_requests(vl):
    d, hf, ours = vl
    pil, ims, ids = _two_image_prompt(d)
    plain = prompt_ids([text_ids(9, 11)], [])
    run = VLRunner(ours, block_size=3, seed=3)
    a, b = run.add("a", ids, ims), run.add("b", plain, [])
    run.step([(a, 20), (b, len(plain))])
    run.step([(a, len(ids) - 20)])
    assert max_abs_diff(run.sequence_logits("a"), hf_vl_logits(hf, d, ids, pil)) < TOL
    assert max_abs_diff(run.sequence_logits("b"), hf_vl_logits(hf, d, plain, [])) < TOL


def test_greedy_generation_matches_transformers(vl):
    d, hf, ours = vl
    pil, ims, ids = _two_image_prompt(d)
    inputs = hf_inputs(d, ids, pil)
    with torch.no_grad():
        out = hf.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=32,
                          min_new_tokens=32, do_sample=False)
    expected = out[0, len(ids):].tolist()
    from glmserve.engine.mm_inputs import build_mm_prompt

    engine = LLMEngine(EngineConfig(model=str(d), dtype="float32", device="cpu",
                                    scheduler=SchedulerConfig(max_num_batched_tokens=24, chunked_prefill_size=24)), loaded=ours)
    engine.add_request("g", ids, SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32),
                       mm=build_mm_prompt(ids, ims, IMAGE, 2))
    got = [t for o in engine.run_until_done(deadline_s=300) for t in o.new_token_ids]
    assert len(expected) == 32
    assert got == expected


def test_published_weight_names_and_config_layout_load(vl, tmp_path):
    """The published GLM-4.5V layout: text weights under `model.` (not `model.language_model.`), an MTP layer
    at `model.layers.{num_hidden_layers}` (skipped), legacy rope keys in text_config; same model as ours."""
    import json

    from safetensors.torch import load_file, save_file

    d, hf, ours = vl
    out = tmp_path / "published"
    out.mkdir()
    weights = load_file(str(d / "model.safetensors"))
    renamed = {k.replace("model.language_model.", "model."): v for k, v in weights.items()}
    n = ours.config.num_hidden_layers
    renamed.update({k.replace("layers.1.", f"layers.{n}."): v.clone() for k, v in renamed.items() if ".layers.1." in k})
    save_file(renamed, str(out / "model.safetensors"))
    raw = json.loads((d / "config.json").read_text())
    text = raw["text_config"]
    rope = text.pop("rope_parameters")
    text.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
                rope_scaling={"type": "default", "mrope_section": rope["mrope_section"]})
    (out / "config.json").write_text(json.dumps(raw))
    for f in ("generation_config.json", "preprocessor_config.json"):
        (out / f).write_text((d / f).read_text())
    other = load_ours(out)
    assert other.config == ours.config
    for (name, p), (_, q) in zip(ours.model.named_parameters(), other.model.named_parameters()):
        assert torch.equal(p, q), name


def test_dense_vl_is_refused_clearly():
    from glmserve.engine.config import parse_hf_config

    with pytest.raises(ValueError, match="unsupported model: model_type='glm4v'"):
        parse_hf_config({"model_type": "glm4v", "architectures": ["Glm4vForConditionalGeneration"]})
