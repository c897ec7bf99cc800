"""Vision encoder throughput and time to first token with and without the encoder cache (tiny glm4v_moe, CPU).

    .venv/bin/python benchmarks/vision_bench.py --out benchmarks/results/cpu/vision_tiny.json

1. images/s through the vision tower (`encode_images`), batches of same-size images, after a warm-up;
2. TTFT offline (`LLM.generate`, max_tokens=1) of a prompt with one image: a new image each time (encoder
   cache miss) vs. an image encoded before whose prompt shares no cached prefix (encoder cache hit), so the
   difference is the encoder alone. Medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import environment, print_table, write_json

from glmserve import LLM, SamplingParams
from glmserve.engine.image_processor import process_image
from glmserve.engine.mm_step import stack_patches
from glmserve.engine.tiny_model import build_tiny_model
from glmserve.engine.vision_config import ImageProcessorConfig


def _image(size: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="32,64", help="square image sides in pixels")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default="benchmarks/results/cpu/vision_tiny.json")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model("glm4v_moe", Path(tmp) / "vl", seed=0)
        llm = LLM(str(model_dir), dtype="float32", show_progress=False, block_size=16)
        model, image_cfg = llm.engine.loaded.model, ImageProcessorConfig.from_dir(model_dir)
        greedy1 = SamplingParams(temperature=0.0, max_tokens=1)
        seed = 1000
        for side in (int(s) for s in args.sizes.split(",")):
            images = [process_image(_image(side, seed + i), image_cfg) for i in range(args.batch)]
            seed += args.batch
            patches, grids = stack_patches(images)
            with torch.inference_mode():
                model.encode_images(patches, grids)  # warm-up
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    model.encode_images(patches, grids)
                    times.append(time.perf_counter() - start)
            tokens = images[0].num_tokens(2)
            enc_s = statistics.median(times)

            def ttft(prompt: str, img) -> float:
                start = time.perf_counter()
                llm.generate({"prompt": prompt, "multi_modal_data": {"image": [img]}}, greedy1)
                return time.perf_counter() - start

            body = "<|begin_of_image|><|image|><|end_of_image|> what is this?<|assistant|>"
            ttft(f"[gMASK]<sop><|user|>warm {body}", _image(side, 1))  # warm-up
            miss, hit = [], []
            for r in range(args.repeats):
                img = _image(side, seed)
                seed += 1
                miss.append(ttft(f"[gMASK]<sop><|user|>first look {r} {body}", img))
                # Other leading text: no prefix-cache block is shared, so the image tokens are computed
                # again, from the cached encoder output.
                hit.append(ttft(f"[gMASK]<sop><|user|>{'another look ' * 2}{r} {body}", img))
            rows.append({"image_px": f"{side}x{side}", "image_tokens": tokens, "batch": args.batch,
                         "encoder_ms_per_batch": enc_s * 1e3, "images_per_s": args.batch / enc_s,
                         "ttft_ms_encoder_miss": statistics.median(miss) * 1e3,
                         "ttft_ms_encoder_hit": statistics.median(hit) * 1e3,
                         "raw_encoder_s": times, "raw_ttft_miss_s": miss, "raw_ttft_hit_s": hit})
        cache = llm.engine.runner.mm.cache
        cache_stats = {"hits": cache.hits, "misses": cache.misses}
    print_table("vision tower and TTFT (tiny glm4v_moe, CPU, fp32)", rows, [
        ("image_px", "image", ""), ("image_tokens", "tokens", "d"), ("images_per_s", "images/s", ",.0f"),
        ("ttft_ms_encoder_miss", "TTFT miss ms", ".1f"), ("ttft_ms_encoder_hit", "TTFT hit ms", ".1f")])
    write_json(args.out, {"environment": environment(torch.device("cpu")), "torch_threads": torch.get_num_threads(),
                          "encoder_cache": cache_stats, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
