"""The GPU benchmarks in benchmarks/: the roofline numbers against the yardsticks in benchmarks/README.md,
the smoke mode of every script (`--device cpu --tiny`: same code at toy shapes, JSON written), and the fast "needs CUDA" stop of
a full run on a machine without a GPU."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
SCRIPTS = ["ceilings", "kernel_bench", "decode_bench", "prefill_bench", "mtp_gpu_bench"]
sys.path.insert(0, str(BENCH))

import roofline  # noqa: E402


@pytest.fixture(scope="module")
def flash():
    from glmserve.engine.presets import preset_config

    return preset_config("GLM-4.7-Flash")


def test_decode_bytes_match_the_design_yardsticks(flash):
    one = roofline.decode_bytes(flash, batch=1, context=1024)
    assert 6.9e9 < one["total"] < 7.5e9  # yardstick: ~7.2 GB per step at batch 1
    assert one["experts_touched_per_layer"] == pytest.approx(flash.num_experts_per_tok)
    b64 = roofline.decode_bytes(flash, batch=64, context=1024)
    assert 59e9 < b64["total"] < 65e9  # ~62 GB: nearly every expert is touched
    assert b64["experts_touched_per_layer"] > 0.95 * flash.n_routed_experts
    assert b64["kv"] == 64 * 1025 * 576 * 2 * flash.num_hidden_layers
    fp8 = roofline.decode_bytes(flash, batch=1, context=1024, weight_bytes=1)
    assert 0.5 * one["weights"] < fp8["weights"] < 0.6 * one["weights"]  # lm_head, kv_b_proj, router stay wide


def test_prefill_flops_match_the_design_yardstick(flash):
    f = roofline.prefill_flops(flash, chunk=1024)
    assert 6.5e9 < f["total"] / 1024 < 8.5e9  # yardstick: ~7 GFLOP per token at 1k context
    longer = roofline.prefill_flops(flash, chunk=8192)
    # per token, causal attention grows with the chunk (the W_UK / W_UV absorption part does not)
    assert longer["attention"] / 8192 > 4 * f["attention"] / 1024
    assert longer["linear"] / 8192 == pytest.approx(f["linear"] / 1024, rel=1e-3)


def test_spec_step_bytes_bracket_the_decode_step(flash):
    one, four = roofline.decode_bytes(flash, 1, 1024), roofline.decode_bytes(flash, 4, 1024)
    s1, s3 = roofline.spec_step_bytes(flash, 1, 1024, 1), roofline.spec_step_bytes(flash, 1, 1024, 3)
    # verifying 3 drafts reads what 4 tokens route to, once, with one sequence's KV
    assert one["total"] < s3["verify"] < four["weights"] + one["kv"] * 1.01
    lm_head = flash.vocab_size * flash.hidden_size * 2
    assert lm_head < s1["draft"] < lm_head + one["weights"] / 20  # one MoE layer and its head
    assert 2.5 * s1["draft"] < s3["draft"] < 3.5 * s1["draft"]  # k MTP forwards
    assert s3["total"] == s3["verify"] + s3["draft"]


def test_expected_experts_touched():
    assert roofline.expected_experts_touched(64, 4, 1) == pytest.approx(4)
    assert roofline.expected_experts_touched(64, 4, 0) == 0
    assert 63 < roofline.expected_experts_touched(64, 4, 256) <= 64


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_mode_runs_and_writes_json(script, tmp_path):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    env = data["environment"]
    assert data["tiny"] is True and env["torch"] == torch.__version__ and "git_commit" in env and "triton" in env
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    if script != "ceilings":
        timed = [r for r in data["rows"] if r.get("runs_ms")]
        assert timed and all(len(r["runs_ms"]) == 2 for r in timed)
    if script == "mtp_gpu_bench":  # every k measured; speed-ups over k = 0 at each acceptance length
        assert {(r["k"], r["mode"]) for r in data["rows"]} == {(k, m) for k in (0, 1, 3) for m in ("eager", "graph")}
        k3 = [r for r in timed if r["k"] == 3]
        assert k3 and all(r["draft_ms"] > 0 and sorted(r["speedup_at"]) == ["1", "2", "3", "4"] for r in k3)
    assert "wrote" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
@pytest.mark.parametrize("script", SCRIPTS)
def test_full_run_without_cuda_stops_with_a_clear_message(script, tmp_path):
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path / "x.json")])
    assert "needs CUDA" in str(stop.value.code) and "--device cpu --tiny" in str(stop.value.code)
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(SystemExit) as stop:
        main(["--device", "cpu"])
    assert "only with --tiny" in str(stop.value.code)
