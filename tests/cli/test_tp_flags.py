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


def test_each_decode_rank_gets_each_of_its_kv_heads_from_exactly_one_prefill_rank(tmp_path):
    from glmserve.engine.loader import resolve_source
    from glmserve.engine.parallel.kv_plan import RankLink, head_layout, is_plain, rank_links
    from glmserve.engine.tiny_model import build_tiny_model

    gqa2 = resolve_source(str(build_tiny_model("glm4_moe", tmp_path / "gqa2")), "auto")[0]  # 6 q heads, 2 KV
    assert head_layout(gqa2, 2) == [(0, 1), (1, 1)]
    assert head_layout(gqa2, 6) == [(0, 1), (0, 1), (0, 1), (1, 1), (1, 1), (1, 1)]  # replicated
    assert head_layout(gqa2, 1) is None
    gqa1 = build_tiny_model("glm4_moe", tmp_path / "gqa1", overrides={"num_key_value_heads": 1})
    assert head_layout(resolve_source(str(gqa1), "auto")[0], 2) is None
    mla = resolve_source(str(build_tiny_model("glm4_moe_lite", tmp_path / "mla")), "auto")[0]
    assert head_layout(mla, 2) is None  # the latent is whole

    assert is_plain(rank_links(gqa2, 1, 1)) and is_plain(rank_links(mla, 2, 1))
    assert rank_links(gqa2, 2, 1) == [RankLink(0, 0, 0, 0, 1), RankLink(1, 0, 0, 1, 1)]  # one rank fed by two
    assert rank_links(gqa2, 1, 2) == [RankLink(0, 0, 0, 0, 1), RankLink(0, 1, 1, 0, 1)]  # one rank feeds two
    assert rank_links(gqa2, 2, 2) == [RankLink(0, 0, 0, 0, 1), RankLink(1, 1, 0, 0, 1)]
    assert rank_links(mla, 2, 2) == [RankLink(0, 0), RankLink(0, 1)]  # rank 0's latent to every decode rank
    for p, d in [(6, 2), (2, 6), (6, 6), (6, 1)]:  # replicated heads: every decode rank's heads, once each
        got = rank_links(gqa2, p, d)
        src, dst = head_layout(gqa2, p) or [(0, 2)], head_layout(gqa2, d) or [(0, 2)] * d
        for rank, (first, count) in enumerate(dst):
            heads = sorted(src[ln.src_rank][0] + ln.src_head + i for ln in got if ln.dst_rank == rank
                           for i in range(ln.num_heads))
            assert heads == list(range(first, first + count)), (p, d, rank, got)
            assert [ln.dst_head for ln in got if ln.dst_rank == rank] == sorted({ln.dst_head for ln in got
                                                                                  if ln.dst_rank == rank})


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
