"""CLI mistakes are one clear line on stderr (exit code 2), never a usage dump or a traceback; `up` counts
and `router` addresses have distinct names (old spellings still work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from glmserve.cli import build_parser


def _glmserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_unknown_flag_is_one_line_naming_the_command():
    line = _one_line(_glmserve("up", "--no-such-flag", "3"))
    assert line.startswith("glmserve up: error: unrecognized arguments: --no-such-flag 3")
    assert "glmserve up --help" in line


def test_bad_model_path_is_one_line():
    for command in (["up"], ["decode", "--grpc-port", "0", "--http-port", "0", "--kv-port", "0"]):
        line = _one_line(_glmserve(*command, "--model", "/no/such/model"))
        assert "'/no/such/model' is neither a model directory nor a preset" in line


def _mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1e6
    return float("inf")


@pytest.mark.skipif(not Path("/proc/meminfo").exists() or _mem_available_gb() > 700,
                    reason="needs Linux and a machine too small for GLM-4.7")
def test_preset_too_large_says_the_size_and_the_fix():
    line = _one_line(_glmserve("prefill", "--model", "GLM-4.7", "--grpc-port", "0", "--http-port", "0"))
    import re

    m = re.search(r"GLM-4\.7 needs (\d+) GB for its ([\d.]+)B parameters in bfloat16", line)
    assert m and 600 < int(m[1]) < 800 and 300 < float(m[2]) < 400, line  # ~355B parameters, 2 bytes each
    assert "GLM-4.7-Flash" in line


def test_up_takes_counts_and_router_takes_addresses_under_distinct_names():
    parser = build_parser()
    up = parser.parse_args(["up", "--num-prefill", "2", "--num-decode", "3"])
    assert (up.prefill, up.decode) == (2, 3)
    assert parser.parse_args(["up", "--prefill", "2"]).prefill == 2  # old spelling
    router = parser.parse_args(["router", "--prefill-addresses", "a:1,b:2", "--decode", "c:3"])
    assert (router.prefill, router.decode) == ("a:1,b:2", "c:3")
    r = _glmserve("up", "--num-prefill", "two")
    assert "argument --num-prefill/--prefill: invalid int value: 'two'" in _one_line(r)
