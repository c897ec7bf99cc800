"""`glmserve bench` reports speculative-decoding acceptance from the servers' Prometheus counters, scraped
before and after the run (vLLM's meanings). The /metrics pages here are written by prometheus_client itself,
as two decode workers whose counters advance between the scrapes."""

from __future__ import annotations

import argparse
import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily

from glmserve.bench import cli
from glmserve.bench.spec_decode import parse_counts
from glmserve.local_ports import free_port


class AdvancingCounters:
    """Each scrape shows the next snapshot: (drafts, draft tokens, accepted, accepted per position)."""

    def __init__(self, prefix: str, snapshots):
        self.prefix, self.snapshots, self.scrapes = prefix, list(snapshots), 0

    def collect(self):
        drafts, draft_tokens, accepted, per_pos = self.snapshots[min(self.scrapes, len(self.snapshots) - 1)]
        self.scrapes += 1
        for name, value in (("num_drafts", drafts), ("num_draft_tokens", draft_tokens), ("num_accepted_tokens", accepted)):
            yield CounterMetricFamily(f"{self.prefix}spec_decode_{name}", name, value=value)
        fam = CounterMetricFamily(f"{self.prefix}spec_decode_num_accepted_tokens_per_pos", "per pos", labels=["position"])
        for pos, n in enumerate(per_pos):
            fam.add_metric([str(pos)], n)
        yield fam


def serve(collector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    port = free_port()
    start_http_server(port, addr="127.0.0.1", registry=registry)
    return f"http://127.0.0.1:{port}/metrics"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_reports_acceptance_summed_over_decode_workers(fake_server, tmp_path, capsys):
    # Worker A: 10 drafts of k=3 during the run, 12 accepted (7 at position 0, 4 at 1, 1 at 2).
    a = AdvancingCounters("glmserve:", [(5, 15, 3, [2, 1, 0]), (15, 45, 15, [9, 5, 1])])
    # Worker B, exporting vLLM's names only: 10 drafts, 8 accepted (5, 2, 1).
    b = AdvancingCounters("vllm:", [(0, 0, 0, [0, 0, 0]), (10, 30, 8, [5, 2, 1])])
    unreachable = f"http://127.0.0.1:{free_port()}/metrics"
    result_file = tmp_path / "out.json"
    args = _args("--base-url", fake_server.base_url, "--model", "ok", "--num-prompts", "3", "--random-input-len", "4",
                 "--random-output-len", "3", "--disable-tqdm", "--result-file", str(result_file),
                 "--metrics-url", serve(a), "--metrics-url", serve(b), "--metrics-url", unreachable)
    assert cli.run(args) == 0
    spec = json.loads(result_file.read_text())["spec_decode"]
    assert (spec["num_drafts"], spec["num_draft_tokens"], spec["num_accepted_tokens"]) == (20, 60, 20)
    assert spec["mean_acceptance_length"] == pytest.approx(1 + 20 / 20)
    assert spec["acceptance_rate"] == pytest.approx(20 / 60)
    assert spec["per_position_acceptance_rate"] == pytest.approx([12 / 20, 6 / 20, 2 / 20])
    out, err = capsys.readouterr()
    assert "Mean acceptance length:                  2.00" in out
    assert "Per-position acceptance (%):             60.0, 30.0, 10.0" in out
    assert f"--metrics-url {unreachable}" in err  # an explicit URL that cannot be read is said, once per scrape error


def test_no_counters_means_no_section(fake_server, tmp_path, capsys):
    result_file = tmp_path / "out.json"
    args = _args("--base-url", fake_server.base_url, "--model", "ok", "--num-prompts", "2", "--random-input-len", "4",
                 "--random-output-len", "2", "--disable-tqdm", "--result-file", str(result_file))
    assert cli.run(args) == 0  # the fake server has no /metrics: nothing to report, nothing to complain about
    out, err = capsys.readouterr()
    assert json.loads(result_file.read_text())["spec_decode"] is None
    assert "Speculative Decoding" not in out and "metrics" not in err


def test_a_server_exporting_both_names_is_counted_once():
    registry = CollectorRegistry()
    registry.register(AdvancingCounters("glmserve:", [(4, 8, 2, [2, 0])]))
    registry.register(AdvancingCounters("vllm:", [(4, 8, 2, [2, 0])]))
    counts = parse_counts(generate_latest(registry).decode())
    assert (counts.drafts, counts.draft_tokens, counts.accepted, counts.accepted_per_pos) == (4, 8, 2, {0: 2, 1: 0})
