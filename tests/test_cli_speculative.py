"""`glmserve serve` takes MTP speculative decoding; the split roles refuse it in one line until it works there."""

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
def test_split_workers_refuse_mtp_in_one_line(tmp_path, role):
    args = _parse(role, "--model", "/m/tiny", "--speculative-algorithm", "mtp")
    with pytest.raises(SystemExit, match="not supported yet across the prefill/decode split"):
        worker_config(args, role, tmp_path)
