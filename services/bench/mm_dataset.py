"""vLLM's `random-mm` dataset: random text plus random images per request, sent as `image_url` data URLs
to the chat endpoint.

Options as `vllm bench serve` spells them: images per request uniform in [base*(1-r), base*(1+r)] capped by
the limit; each image's size drawn from the bucket config, a dict {(height, width, frames): probability}
(frames must be 1: images only). Pixels are uniform noise, JPEG-encoded, all deterministic in the seed.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import random

from glmserve.bench.datasets import RandomText, SampleRequest, TextTokenizer, _check_ratio, _length

DEFAULT_BUCKETS = "{(256, 256, 1): 0.5, (720, 1280, 1): 0.5}"
DEFAULT_LIMIT = '{"image": 255, "video": 0}'


def parse_buckets(text: str) -> list[tuple[tuple[int, int], float]]:
    """'{(h, w, 1): p, ...}' -> [((h, w), p)] with probabilities normalized."""
    try:
        raw = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"--random-mm-bucket-config: expected {{(height, width, 1): probability, ...}}, got {text!r}")
    if not isinstance(raw, dict) or not raw:
        raise ValueError("--random-mm-bucket-config: expected a non-empty dict")
    out = []
    for key, p in raw.items():
        if not (isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, int) and k > 0 for k in key)):
            raise ValueError(f"--random-mm-bucket-config: bucket {key!r} is not (height, width, frames)")
        if key[2] != 1:
            raise ValueError(f"--random-mm-bucket-config: bucket {key!r} has {key[2]} frames; only images (1) are served")
        if not isinstance(p, (int, float)) or p < 0:
            raise ValueError(f"--random-mm-bucket-config: probability {p!r} of {key!r} must be >= 0")
        out.append(((key[0], key[1]), float(p)))
    total = sum(p for _, p in out)
    if total <= 0:
        raise ValueError("--random-mm-bucket-config: the probabilities add up to 0")
    return [(hw, p / total) for hw, p in out]


def parse_image_limit(text: str) -> int:
    try:
        raw = json.loads(text)
    except ValueError:
        raise ValueError(f'--random-mm-limit-mm-per-prompt: expected JSON like {{"image": 4}}, got {text!r}')
    if not isinstance(raw, dict) or any(k not in ("image", "video") for k in raw) or raw.get("video", 0):
        raise ValueError("--random-mm-limit-mm-per-prompt: only images are sent ({\"image\": N, \"video\": 0})")
    limit = raw.get("image", 0)
    if not isinstance(limit, int) or limit < 0:
        raise ValueError("--random-mm-limit-mm-per-prompt: the image limit must be an integer >= 0")
    return limit


def random_image_data_url(rng: random.Random, height: int, width: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(rng.getrandbits(64)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def random_mm_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                       base_items: int, items_range_ratio: float, limit: int,
                       buckets: list[tuple[tuple[int, int], float]],
                       tokenizer: TextTokenizer | None = None) -> list[SampleRequest]:
    _check_ratio(range_ratio)
    if not 0.0 <= items_range_ratio <= 1.0:
        raise ValueError(f"--random-mm-num-mm-items-range-ratio must be in [0, 1], got {items_range_ratio}")
    if base_items < 0:
        raise ValueError("--random-mm-base-items-per-request must be >= 0")
    rng = random.Random(seed)
    text = RandomText(tokenizer)
    sizes, weights = [hw for hw, _ in buckets], [p for _, p in buckets]
    low = int(base_items * (1 - items_range_ratio))
    high = min(limit, int(base_items * (1 + items_range_ratio) + 0.5))
    out = []
    for _ in range(num_prompts):
        prompt, prompt_len = text.make(rng, _length(rng, input_len, range_ratio))
        n = rng.randint(min(low, high), high)
        images = tuple(random_image_data_url(rng, *rng.choices(sizes, weights)[0]) for _ in range(n))
        out.append(SampleRequest(prompt, prompt_len, _length(rng, output_len, range_ratio), images))
    return out
