"""MTP acceptance on a checkpoint whose target and MTP layer are both trained (trained_mtp_model.py): the
drafts are good, so mean acceptance length is high, far above a random MTP layer's, and greedy output is
still exactly the output without speculation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmserve import LLM, SamplingParams
from glmserve.engine.tiny_model import build_tiny_model
from tests.engine.trained_mtp_model import cycle_tokens, cycle_window, train_mtp_model

STARTS = (0, 30, 61)
PROMPT_LEN, NEW_TOKENS = 8, 40
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_mtp_model(tmp_path_factory.mktemp("mtp") / "model")


def _prompts():
    cycle = cycle_tokens()
    return [cycle_window(cycle, s, PROMPT_LEN) for s in STARTS], [cycle_window(cycle, s + PROMPT_LEN, NEW_TOKENS)
                                                                 for s in STARTS]


def _generate(model_dir, k: int | None):
    spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
    llm = LLM(str(model_dir), dtype="float32", show_progress=False, speculative_config=spec)
    prompts, _ = _prompts()
    out = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]
    return out, (llm.engine.speculator.stats if k else None)


def test_trained_drafts_are_accepted_and_greedy_output_is_unchanged(trained):
    _, continuations = _prompts()
    plain, _ = _generate(trained, None)
    assert plain == continuations  # the target learned the cycle
    with_mtp, stats = _generate(trained, 3)
    assert with_mtp == plain
    # Every verify pass proposes 3 drafts (fewer only when max_tokens is near); a trained layer gets them right.
    assert stats.mean_acceptance_length >= 3.0, stats
    assert stats.accepted_per_position[0] >= 0.9 * stats.num_drafts, stats
    # Random MTP weights (same machinery, an untrained checkpoint) accept next to nothing.
    random_dir = build_tiny_model("glm4_moe", trained.parent / "random", seed=3)
    _, random_stats = _generate(random_dir, 3)
    assert random_stats.num_drafts > 0 and random_stats.mean_acceptance_length < 1.5, random_stats


def test_trained_k1_accepts_nearly_every_draft(trained):
    out, stats = _generate(trained, 1)
    assert out == _prompts()[1]
    assert stats.num_accepted_tokens >= 0.9 * stats.num_draft_tokens, stats


def test_mtp_bench_runs_on_the_trained_checkpoint(trained, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "mtp.json"
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "mtp_bench.py"), "--model-dir", str(trained),
                           "--batches", "1", "--ks", "3", "--new-tokens", "12", "--repeats", "1", "--out", str(out)],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["environment"]["git_commit"] and "3 target layers" in data["checkpoint"]
    (acc,) = data["acceptance"]
    assert acc["k"] == 3 and acc["mean_acceptance_length"] >= 3.0 and len(acc["per_position"]) == 3
    assert [(r["batch"], r["k"]) for r in data["decode"]] == [(1, 0), (1, 3)]
    assert all(r["tokens_per_s"] > 0 and r["steps"] > 0 for r in data["decode"])
    assert data["decode"][1]["steps"] < data["decode"][0]["steps"]  # several tokens per step
    assert "Decode tokens/s" in proc.stdout


def test_penalties_and_min_tokens_over_accepted_drafts_match_no_speculation(trained):
    """Greedy rows whose sampling depends on the history (penalties, min_tokens) verify every draft position
    against the history up to it: same tokens as without MTP, with drafts both accepted and rejected."""
    cycle = cycle_tokens()
    # The prompt holds cycle tokens 30..33 up front: the penalties push them down when the cycle reaches them.
    prompt = cycle_window(cycle, 30, 4) + cycle_window(cycle, 0, 8)
    params = SamplingParams(temperature=0.0, max_tokens=32, min_tokens=24, repetition_penalty=3.0,
                            frequency_penalty=0.5)
    outs = []
    for spec in (None, {"method": "mtp", "num_speculative_tokens": 3}):
        llm = LLM(str(trained), dtype="float32", show_progress=False, speculative_config=spec)
        outs.append(llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids)
    assert outs[1] == outs[0]
    assert outs[0][:22] == cycle_window(cycle, 8, 22) and outs[0][22] != cycle[30]  # the penalty changed course
    stats = llm.engine.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens, stats


def test_verify_penalises_each_position_with_the_drafts_before_it(trained):
    """The check above cannot see the drafts' own share of the history (the cycle never repeats a token
    within a verify pass), so here the logits are set by hand: draft X is accepted at position 0, and at
    position 1 X leads Y by less than the repetition penalty takes off once X is in the history."""
    llm = LLM(str(trained), dtype="float32", show_progress=False,
              speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    eng = llm.engine
    x, y = 10, 11
    req = eng.add_request("r", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=3.0,
                                                         ignore_eos=True))
    logits = torch.zeros(3, eng.model_config.vocab_size)
    logits[:, x], logits[1:, y] = 5.0, 4.0  # 5 / 3 < 4: penalised once, X loses to Y
    new_tokens, accepted = [[]], [0]
    eng.speculator._verify_greedy([0], [(req, None, None, [x, x])], logits, [0], new_tokens, accepted)
    assert [t.token_id for t in new_tokens[0]] == [x, y] and accepted == [1]
