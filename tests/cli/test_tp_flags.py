"""Tensor-parallel flags: what `serve` accepts and passes on, and the one-line refusals of layouts that
cannot start (before any model is loaded or process started)."""

from __future__ import annotations

import pytest

from glmserve import cli
from glmserve.cli_args import engine_config


def _engine(words):
    return engine_config(cli._parse(["serve", "--model", "/nonexistent/m", *words]), cli.cache_dir())


def test_flags_reach_the_engine_config():
    eng = _engine(["--tp", "4", "--enable-expert-parallel", "--nnodes", "2", "--node-rank", "1",
                   "--dist-init-addr", "10.0.0.1:5000"])
    assert (eng.tensor_parallel_size, eng.enable_expert_parallel) == (4, True)
    assert (eng.nnodes, eng.node_rank, eng.dist_init_addr) == (2, 1, "10.0.0.1:5000")


@pytest.mark.parametrize("words, message", [
    (["--tp", "0"], "--tensor-parallel-size must be at least 1"),
    (["--tp", "3", "--nnodes", "2", "--dist-init-addr", "h:1"], "--nnodes 2 must divide --tensor-parallel-size 3"),
    (["--tp", "2", "--nnodes", "2"], "--nnodes > 1 needs --dist-init-addr HOST:PORT"),
    (["--tp", "2", "--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"], "--node-rank 2 is outside 0..1"),
    (["--nnodes", "2", "--dist-init-addr", "h:1"], "need --tensor-parallel-size > 1"),
    (["--tp", "2", "--speculative-algorithm", "mtp"], "does not support --tensor-parallel-size > 1 yet"),
])
def test_layouts_that_cannot_start_are_refused_in_one_line(words, message):
    with pytest.raises(SystemExit) as exc:
        _engine(words)
    assert message in str(exc.value.code) and "\n" not in str(exc.value.code)


@pytest.mark.parametrize("command", ["prefill", "decode"])
def test_workers_take_tp_on_one_machine_and_across_nodes(command):
    args = cli._parse([command, "--model", "/nonexistent/m", "--tp", "2", "--enable-expert-parallel"])
    eng = engine_config(args, cli.cache_dir())
    assert (eng.tensor_parallel_size, eng.enable_expert_parallel) == (2, True)
    args = cli._parse([command, "--model", "/nonexistent/m", "--tp", "4", "--nnodes", "2", "--node-rank", "1",
                       "--dist-init-addr", "h:1"])
    eng = engine_config(args, cli.cache_dir())
    assert (eng.tensor_parallel_size, eng.nnodes, eng.node_rank, eng.dist_init_addr) == (4, 2, 1, "h:1")


def test_the_leader_keeps_a_full_head_mirror_only_when_the_ranks_split_the_kv_heads(tmp_path):
    from glmserve.engine.loader import resolve_source
    from glmserve.engine.tiny_model import build_tiny_model
    from glmserve.worker.rank_group import kv_head_slices

    def slices(model, tp):
        return kv_head_slices(resolve_source(str(model), "auto")[0], tp)

    gqa2 = build_tiny_model("glm4_moe", tmp_path / "gqa2")  # 6 query heads, 2 KV heads
    assert slices(gqa2, 2) == [(0, 1), (1, 1)]
    assert slices(gqa2, 6) == [(0, 1), (0, 1), (0, 1), (1, 1), (1, 1), (1, 1)]  # replicated
    assert slices(gqa2, 1) is None
    assert slices(build_tiny_model("glm4_moe", tmp_path / "gqa1", overrides={"num_key_value_heads": 1}), 2) is None
    assert slices(build_tiny_model("glm4_moe_lite", tmp_path / "mla"), 2) is None  # the latent is whole


def test_a_model_that_does_not_split_is_refused_before_any_rank_starts(tmp_path):
    from glmserve.engine.tiny_model import build_tiny_model

    model_dir = build_tiny_model("glm4_moe", tmp_path / "m")  # 6 heads: not divisible by 4
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--model", str(model_dir), "--tp", "4", "--dtype", "float32"])
    assert "is not divisible by the tensor-parallel size 4" in str(exc.value.code)


def test_vision_models_are_refused_under_tp(tmp_path):
    from glmserve.engine.config import EngineConfig
    from glmserve.engine.parallel.rank_group import check_shardable
    from glmserve.engine.tiny_checkpoint import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint("glm4v_moe", tmp_path / "vl")["model_dir"]
    with pytest.raises(ValueError, match="tensor parallelism does not support the vision models"):
        check_shardable(EngineConfig(model=str(model_dir), tensor_parallel_size=2))
