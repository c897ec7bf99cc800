"""The router's image intake (router/vision_inputs.py) without a server: size caps on files and decoded
pixels, the per-request image limit, and the vision settings read from a checkpoint."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest

from glmserve.router.config import RouterConfig
from glmserve.router.errors import APIError
from glmserve.router.vision_inputs import VisionInputs
from tests.engine.vl_reference import IMAGE, make_vl_model, random_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_vl_model(tmp_path_factory.mktemp("vision_inputs"), seed=2)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _inputs(model_dir, **kw) -> VisionInputs:
    vi = VisionInputs.for_model(RouterConfig(model=str(model_dir), served_model_name="m", **kw))
    assert vi is not None
    return vi


def _prepare(vi, urls):
    ids = [1] + [IMAGE, 2] * len(urls)
    return asyncio.run(vi.prepare(ids, urls))


def test_text_models_have_no_vision(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"]}')
    assert VisionInputs.for_model(RouterConfig(model=str(tmp_path), served_model_name="m")) is None


def test_file_over_the_byte_cap(model_dir, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(_png(random_image(64, 64, seed=1)))
    vi = _inputs(model_dir, allowed_local_media_path=str(tmp_path), max_image_bytes=100)
    with pytest.raises(APIError, match="larger than 100 bytes") as exc:
        _prepare(vi, [str(big)])
    assert exc.value.status == 400


def test_decoded_pixels_over_the_cap(model_dir):
    url = "data:image/png;base64," + base64.b64encode(_png(random_image(64, 64, seed=1))).decode()
    vi = _inputs(model_dir, max_image_pixels=1000)
    with pytest.raises(APIError, match="over the limit of 1000 pixels"):
        _prepare(vi, [url])
    ids, mm = _prepare(_inputs(model_dir), [url])
    assert mm.images[0].num_tokens == ids.count(IMAGE) > 1


def test_image_limit_and_local_files_off_by_default(model_dir, tmp_path):
    parts = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}] * 3}]
    with pytest.raises(APIError, match="at most 2 images"):
        _inputs(model_dir, limit_mm_per_prompt=2).split(parts)
    with pytest.raises(APIError, match="--allowed-local-media-path"):
        _prepare(_inputs(model_dir), [str(tmp_path / "x.png")])


def test_limit_flag_forms():
    from glmserve.cli_args import _image_limit

    assert _image_limit("3") == 3 and _image_limit('{"image": 5}') == 5 and _image_limit('{"video": 0}') == RouterConfig.limit_mm_per_prompt
    for bad in ('{"video": 1}', "-1", "x"):
        with pytest.raises(SystemExit):
            _image_limit(bad)
