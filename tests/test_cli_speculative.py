"""MTP speculative decoding flags: `glmserve serve` and the split roles (prefill, decode) take every spelling."""

from __future__ import annotations

import pytest

from glmserve import cli
from glmserve.cli_args import engine_config, worker_config


def _parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_serve_builds_an_mtp_engine_config(tmp_path):
    args = _parse("serve", "--model", "/m/tiny", "--speculative-algorithm", "mtp", "--speculative-num-steps", "3")
    cfg = engine_config(args, tmp_path)
    assert (cfg.speculative_algorithm, cfg.speculative_num_steps, cfg.with_mtp) == ("mtp", 3, True)


@pytest.mark.parametrize("steps", ["0", "5"])
def test_serve_refuses_steps_out_of_range(tmp_path, steps):
    args = _parse("serve", "--model", "/m/tiny", "--speculative-algorithm", "mtp", "--speculative-num-steps", steps)
    with pytest.raises(SystemExit, match=r"--speculative-num-steps must be in 1\.\.4"):
        engine_config(args, tmp_path)


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


def test_worker_with_a_checkpoint_without_mtp_weights_fails_in_one_line(tmp_path):
    role = "decode"  # prefill loads its engine through the same worker/server.py
    import subprocess
    import sys

    from glmserve.engine.tiny_model import build_tiny_model

    model_dir = build_tiny_model("glm4_moe", tmp_path / "m", seed=1, overrides={"num_nextn_predict_layers": 0})
    proc = subprocess.run([sys.executable, "-m", "glmserve.cli", role, "--model", str(model_dir), "--dtype", "float32",
                           "--no-progress", "--grpc-port", "0", "--http-port", "0", "--mtp-step", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"glmserve {role}: error: speculative decoding with MTP needs the "
                                                f"checkpoint's MTP layer; {model_dir} has no MTP weights "
                                                "(num_nextn_predict_layers = 0 or no mtp tensors)"]
