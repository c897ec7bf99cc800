"""benchmarks/host_step_bench.py keeps working against the engine's public surface (the lead reruns it
after engine changes): a small run drives the real engine with the stub model and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_host_step_bench_small_run(tmp_path):
    out = tmp_path / "host.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "host_step_bench.py"), "--seqs", "1,3", "--contexts", "40,70",
           "--warmup", "1", "--iters", "2", "--rounds", "3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert [(r["num_seqs"], r["context"]) for r in rows] == [(1, 40), (3, 40), (1, 70), (3, 70)]
    for r in rows:
        # every row timed in each of the 3 rounds (interleaved bursts), 2 steps each
        assert [len(f["host_ms"]) for f in r["rounds"]] == [2, 2, 2]
        assert len(r["host_ms_runs"]) == 6 and all(0 < t <= r["step_ms_median"] * 10 for t in r["host_ms_runs"])
        assert r["host_ms_median"] <= r["step_ms_median"]  # host time excludes the stub's own time
        assert r["host_ms_min"] == min(r["host_ms_runs"])
        assert len(r["x_vs_shortest_context_per_round"]) == 3
    by_key = {(r["num_seqs"], r["context"]): r for r in rows}
    assert by_key[3, 70]["x_vs_shortest_context"] == by_key[3, 70]["host_ms_median"] / by_key[3, 40]["host_ms_median"]
    assert payload["peak_rss_mib"] > 0 and payload["environment"]["git_commit"]
    assert "host ms" in proc.stdout  # the table
