"""MTP speculative decoding flags: `glmserve serve` and the split roles (prefill, decode) take every spelling."""

from __future__ import annotations

import pytest

from glmserve import cli
from glmserve.cli_args import engine_config, worker_config


def _parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_serve_builds_an_mtp_engine_config(tmp_path):
    args = _parse("serve", "--model", "/m/tiny", "--speculative-algorithm", "mtp", "--speculative-num-steps", "3")
    cfg = engine_config(args, tmp_path, single_process=True)
    assert (cfg.speculative_algorithm, cfg.speculative_num_steps, cfg.with_mtp) == ("mtp", 3, True)


@pytest.mark.parametrize("steps", ["0", "5"])
def test_serve_refuses_steps_out_of_range(tmp_path, steps):
    args = _parse("serve", "--model", "/m/tiny", "--speculative-algorithm", "mtp", "--speculative-num-steps", steps)
    with pytest.raises(SystemExit, match=r"--speculative-num-steps must be in 1\.\.4"):
        engine_config(args, tmp_path, single_process=True)


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("argv", [["--speculative-algorithm", "mtp", "--speculative-num-steps", "2"],
                                  ["--speculative-config", '{"method":"mtp","num_speculative_tokens":2}'],
                                  ["--mtp-step", "2"], ["--mtp_step", "2"]])
def test_split_workers_take_mtp_in_every_spelling(tmp_path, role, argv):
    args = cli._parse([role, "--model", "/m/tiny", *argv])
    cfg = worker_config(args, role, tmp_path).engine
    assert (cfg.speculative_algorithm, cfg.speculative_num_steps, cfg.with_mtp) == ("mtp", 2, True)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_split_workers_refuse_bad_mtp_settings_in_one_line(role, capsys):
    with pytest.raises(SystemExit):
        cli._parse([role, "--model", "/m/tiny", "--speculative-config", '{"method":"mtp","num_speculative_tokens":7}'])
    assert "num_speculative_tokens must be an integer in 1..4" in capsys.readouterr().err
