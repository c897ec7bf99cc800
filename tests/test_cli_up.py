"""`glmserve up` takes every engine flag `glmserve serve` takes and hands each to the workers of both roles.

Checked without starting processes: parse `up`, build the launcher's command lines, and parse each
worker's command line again with the real CLI.
"""

from __future__ import annotations

import argparse

import pytest

from glmserve import cli
from glmserve.cli_args import add_engine_args
from glmserve.launcher import process_specs

# Not implemented yet, or only valid with another flag (--speculative-num-steps: see the MTP test below;
# --dist-timeout: with tensor parallelism, below).
REFUSED = {"--speculative-num-steps", "--nnodes", "--node-rank", "--dist-init-addr", "--dist-timeout"}


def _engine_actions() -> list[argparse.Action]:
    probe = argparse.ArgumentParser(add_help=False)
    add_engine_args(probe, with_host=False)
    return probe._actions


def _options(command: str) -> set[str]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {o for a in sub.choices[command]._actions for o in a.option_strings}


def _non_default_argv(action: argparse.Action) -> list[str]:
    """Command-line words that set `action` to something other than its default."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return ["--no-" + flag[2:]] if action.default else [flag]
    if action.nargs == 0:
        return [flag]
    if action.choices:
        return [flag, next(c for c in action.choices if c != action.default)]
    if action.type is int:
        return [flag, str((action.default or 0) + 3)]
    if action.type is float:
        return [flag, str((action.default or 0) + 0.25)]
    return [flag, "cpu"]  # --device, the one free-form string


def _workers(argv: list[str]):
    up = cli.build_parser().parse_args(["up", "--model", "/m/tiny", "--prefill", "2", "--decode", "3", *argv])
    specs = process_specs(cli.up_plan(up, "/m/tiny"), iter(range(30000, 30100)))
    workers = [s for s in specs if s.name != "router"]
    assert [s.args[0] for s in workers] == ["prefill"] * 2 + ["decode"] * 3
    return up, [cli.build_parser().parse_args(list(s.args)) for s in workers], specs[-1]


@pytest.mark.parametrize("action", [a for a in _engine_actions() if a.option_strings[0] not in REFUSED],
                         ids=lambda a: a.option_strings[0])
def test_each_engine_flag_reaches_every_worker(action):
    argv = _non_default_argv(action)
    up, workers, _ = _workers(argv)
    assert getattr(up, action.dest) != action.default, argv
    for w in workers:
        assert getattr(w, action.dest) == getattr(up, action.dest), (w.command, argv)
        # ...and nothing else changed: every other engine flag keeps up's value.
        for other in _engine_actions():
            if other.dest != "torch_threads":
                assert getattr(w, other.dest) == getattr(up, other.dest), (w.command, other.dest)


def test_defaults_pass_no_engine_flags_but_split_the_cores():
    up, workers, router = _workers([])
    for w in workers:
        assert w.torch_threads >= 1 and w.served_model_name == "tiny" and w.model == "/m/tiny"
    assert "--max-model-len" not in router.args
    r = cli.build_parser().parse_args(["up", "--max-model-len", "512", "--routing-policy", "round-robin",
                                       "--reasoning-parser", "glm45"])
    router_args = process_specs(cli.up_plan(r, "/m/tiny"), iter(range(30000, 30100)))[-1].args
    routed = cli.build_parser().parse_args(list(router_args))
    assert (routed.max_model_len, routed.routing_policy, routed.reasoning_parser) == (512, "round-robin", "glm45")


@pytest.mark.parametrize("argv, message", [
    (["--speculative-num-steps", "2"], "--speculative-num-steps needs --speculative-algorithm mtp"),
    (["--tp", "2", "--nnodes", "2", "--dist-init-addr", "h:1"], "glmserve up starts every worker on this machine"),
    (["--decode-tensor-parallel-size", "0"], "--prefill/--decode-tensor-parallel-size must be at least 1"),
    (["--dist-timeout", "5"], "--dist-timeout needs --tensor-parallel-size > 1"),
    (["--tp", "2", "--dist-timeout", "0"], "--dist-timeout must be positive"),
    (["--decode", "0"], "--prefill and --decode need at least 1 worker each"),
])
def test_flags_not_implemented_yet_are_refused_before_anything_starts(argv, message):
    up = cli.build_parser().parse_args(["up", *argv])
    with pytest.raises(SystemExit, match=message):
        cli.up_plan(up, "/m/tiny")


@pytest.mark.parametrize("argv", [["--speculative-algorithm", "mtp", "--speculative-num-steps", "3"],
                                  ["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 3}'],
                                  ["--mtp-step", "3"], ["--mtp_step", "3"]])
def test_mtp_settings_reach_both_roles(argv):
    up = cli._parse(["up", "--model", "/m/tiny", *argv])
    specs = process_specs(cli.up_plan(up, "/m/tiny"), iter(range(30000, 30100)))
    workers = [cli._parse(list(s.args)) for s in specs if s.name != "router"]
    assert {w.command for w in workers} == {"prefill", "decode"}
    assert all((w.speculative_algorithm, w.speculative_num_steps) == ("mtp", 3) for w in workers)


def test_up_takes_exactly_serves_flags_plus_worker_counts():
    assert _options("up") - {"--prefill", "--decode", "--num-prefill", "--num-decode", "--prefill-tensor-parallel-size",
                             "--decode-tensor-parallel-size"} == _options("serve")
    engine = {o for a in _engine_actions() for o in a.option_strings}
    assert engine <= _options("up") and engine <= _options("prefill") and engine <= _options("decode")


@pytest.mark.parametrize("argv, want", [
    (["--tp", "2"], {"prefill": 2, "decode": 2}),
    (["--prefill-tensor-parallel-size", "2"], {"prefill": 2, "decode": 1}),
    (["--tp", "2", "--decode-tensor-parallel-size", "1"], {"prefill": 2, "decode": 1}),
])
def test_each_role_gets_its_tensor_parallel_size_and_the_cores_are_split_among_all_ranks(argv, want, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 48)
    up, workers, _ = _workers(argv)
    ranks = 2 * want["prefill"] + 3 * want["decode"]
    for w in workers:
        assert w.tensor_parallel_size == want[w.command], (w.command, argv)
        assert w.torch_threads == 48 // ranks


def test_dist_timeout_reaches_the_tensor_parallel_workers():
    up = cli._parse(["up", "--model", "/m/tiny", "--decode-tensor-parallel-size", "2", "--dist-timeout", "300"])
    specs = process_specs(cli.up_plan(up, "/m/tiny"), iter(range(30000, 30100)))
    workers = {s.name: cli._parse(list(s.args)) for s in specs if s.name != "router"}
    assert workers["decode-0"].dist_timeout == 300.0 and workers["decode-0"].tensor_parallel_size == 2
    # the TP 1 prefill worker has no group: it keeps the default rather than refusing the flag
    assert workers["prefill-0"].dist_timeout == 60.0 and workers["prefill-0"].tensor_parallel_size == 1
