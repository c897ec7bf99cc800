"""An idle tensor-parallel group stays up: the followers wait for the next step under the group timeout
(--dist-timeout), so the leader sends them an empty step while idle. Here the timeout is 3 s and the group
idles for 9 s between two requests: without those messages the follower's wait expires and the group
breaks (found as a real bug: every TP worker died after a minute without requests)."""

from __future__ import annotations

import time

import pytest

from glmserve.engine.config import CacheConfig, EngineConfig
from glmserve.engine.engine import LLMEngine
from glmserve.engine.parallel.rank_group import start_rank_group
from glmserve.engine.sampling_params import SamplingParams
from glmserve.engine.tiny_model import build_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def _generate(engine: LLMEngine, rid: str) -> list[int]:
    engine.add_request(rid, [5, 6, 7, 8], GREEDY)
    return [t for o in engine.run_until_done(deadline_s=60) for t in o.new_token_ids]


@pytest.mark.timeout(120)
def test_idle_group_outlives_its_timeout(tmp_path):
    model = build_tiny_model("glm4_moe_lite", tmp_path / "model", seed=3)
    cfg = EngineConfig(model=str(model), dtype="float32", show_progress=False, cache=CacheConfig(num_blocks=32),
                       tensor_parallel_size=2, dist_timeout_s=3.0)
    deaths: list[str] = []
    cfg, group = start_rank_group(cfg, 1, on_rank_death=deaths.append)
    engine = None
    try:
        engine = LLMEngine(cfg)
        group.attach(engine.runner)
        first = _generate(engine, "a")
        time.sleep(9.0)  # three group timeouts without a step
        assert deaths == [] and all(p.is_alive() for p in group.procs)
        assert _generate(engine, "b") == first
    finally:
        group.close(engine.runner if engine is not None else None)
    assert deaths == []
