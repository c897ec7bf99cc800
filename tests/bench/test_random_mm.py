"""vLLM's random-mm dataset in `glmserve bench`: bucket and limit parsing, deterministic requests with the
asked image counts and sizes, chat payloads with image_url parts, and the refusals."""

from __future__ import annotations

import argparse
import base64
import io

import pytest

from glmserve.bench import cli
from glmserve.bench.client import CHAT_ENDPOINT, build_payload
from glmserve.bench.mm_dataset import parse_buckets, parse_image_limit, random_mm_requests
from glmserve.bench.options import normalize_options


def _size(url: str) -> tuple[int, int]:
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return img.height, img.width


def test_bucket_and_limit_parsing():
    assert parse_buckets("{(32, 48, 1): 1, (16, 16, 1): 3}") == [((32, 48), 0.25), ((16, 16), 0.75)]
    for bad in ("{(32, 48, 2): 1}", "{(32, 48): 1}", "[1]", "{(8, 8, 1): 0}", "nope"):
        with pytest.raises(ValueError, match="bucket-config"):
            parse_buckets(bad)
    assert parse_image_limit('{"image": 3, "video": 0}') == 3
    with pytest.raises(ValueError, match="only images"):
        parse_image_limit('{"video": 1}')


def test_requests_have_the_asked_images_and_are_deterministic():
    buckets = parse_buckets("{(24, 40, 1): 0.5, (48, 32, 1): 0.5}")
    reqs = random_mm_requests(12, 10, 5, 0.0, seed=3, base_items=2, items_range_ratio=0.5, limit=2, buckets=buckets)
    again = random_mm_requests(12, 10, 5, 0.0, seed=3, base_items=2, items_range_ratio=0.5, limit=2, buckets=buckets)
    assert reqs == again
    counts = {len(r.images) for r in reqs}
    assert counts <= {1, 2} and len(counts) == 2  # [1, 3] capped by the limit of 2
    sizes = {_size(u) for r in reqs for u in r.images}
    assert sizes == {(24, 40), (48, 32)}
    payload = build_payload(CHAT_ENDPOINT, "m", reqs[0], 0.0, True)
    parts = payload["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * len(reqs[0].images) + ["text"]
    assert parts[-1]["text"] == reqs[0].prompt


def test_random_mm_needs_the_chat_endpoint():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--dataset-name", "random-mm", "--backend", "openai"])
    with pytest.raises(ValueError, match="use --backend openai-chat"):
        normalize_options(args)
