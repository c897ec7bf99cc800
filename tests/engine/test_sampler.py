import math

import pytest
import torch

from glmserve.engine.sampler import (
    TOP_P_CANDIDATES, SampledToken, Sampler, SamplingRow, apply_min_p, apply_penalties, apply_top_k,
    apply_top_p, argmax_rows, token_counts)
from glmserve.engine.sampling_params import SamplingParams

NEG_INF = float("-inf")


def row(params=None, prompt=(0,), output=(), seed=None, eos=frozenset()):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params or SamplingParams(), list(prompt) + list(output), len(prompt), gen, frozenset(eos))


def kept(masked: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(r != NEG_INF).flatten().tolist()) for r in masked]


def flat_logits(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 0.5


# -- seeds -----------------------------------------------------------------------------------------

def _seeded_run(seed: int, steps: int, batch_logits, position: int, others) -> list[int]:
    """`steps` tokens for one seeded request sitting at `position` among `others`."""
    sampler, target = Sampler(), row(SamplingParams(temperature=1.0, top_p=0.95), seed=seed)
    out = []
    for step in range(steps):
        rows = list(others)
        rows.insert(position, target)
        out.append(sampler(batch_logits(step, len(rows), position), rows)[position].token_id)
    return out


def test_same_seed_same_tokens_regardless_of_batch():
    vocab = 2000

    def logits_for(step, batch, position):
        # the target row's logits depend only on the step; the other rows get unrelated values
        out = flat_logits(batch, vocab, seed=1000 + step + batch)
        out[position] = flat_logits(1, vocab, seed=step)[0]
        return out

    alone = _seeded_run(7, 12, logits_for, 0, [])
    assert alone == _seeded_run(7, 12, logits_for, 0, [])
    others = [row(SamplingParams(temperature=0.8)), row(SamplingParams(temperature=0.0)),
              row(SamplingParams(temperature=1.3, top_k=5), seed=99), row(SamplingParams(min_p=0.1), seed=3)]
    torch.manual_seed(123)  # the unseeded neighbours draw from the global RNG: it must not matter
    assert alone == _seeded_run(7, 12, logits_for, 2, others)
    torch.manual_seed(456)
    assert alone == _seeded_run(7, 12, logits_for, 4, others)
    assert len(set(alone)) > 3  # it really sampled, rather than repeating one token


def test_different_seeds_differ():
    logits = flat_logits(1, 2000)
    sampler = Sampler()
    runs = []
    for seed in (1, 2, 3):
        r = row(SamplingParams(), seed=seed)
        runs.append([sampler(logits, [r])[0].token_id for _ in range(10)])
    assert runs[0] != runs[1] and runs[1] != runs[2] and runs[0] != runs[2]


# -- greedy ----------------------------------------------------------------------------------------

def test_greedy_is_argmax_and_top_k_1_matches():
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(5)) * 3
    rows = [row(SamplingParams(temperature=0.0)), row(SamplingParams(temperature=0.9, top_k=1)),
            row(SamplingParams(temperature=0.0), seed=4), row(SamplingParams(temperature=2.0, top_k=1), seed=8),
            row(SamplingParams(temperature=0.0, logprobs=2)), row(SamplingParams(temperature=0.5, top_k=1))]
    before = logits.clone()
    got = [t.token_id for t in Sampler()(logits, rows)]
    assert got == logits.argmax(dim=-1).tolist()
    assert torch.equal(logits, before)  # the caller's logits are not written


def test_greedy_does_not_consume_the_generator():
    r = row(SamplingParams(temperature=0.0), seed=5)
    state = r.generator.get_state()
    Sampler()(flat_logits(1, 100), [r])
    assert torch.equal(r.generator.get_state(), state)


# -- mask helpers ----------------------------------------------------------------------------------

def test_top_k_keeps_the_k_largest_and_ties_at_the_kth():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0],
                           [5.0, 4.0, 4.0, 1.0, 0.0],
                           [5.0, 4.0, 4.0, 1.0, 0.0],
                           [0.5, 0.1, 0.3, 0.2, 0.4],
                           [0.5, 0.1, 0.3, 0.2, 0.4]])
    masked = apply_top_k(logits, torch.tensor([2, 2, 1, 0, 99]))
    assert kept(masked) == [{1, 3}, {0, 1, 2}, {0}, {0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}]
    assert torch.equal(masked[masked != NEG_INF], logits[masked != NEG_INF])  # survivors untouched
    assert kept(apply_top_k(logits[:1], torch.tensor([3]))) == [{1, 2, 3}]


def test_top_p_keeps_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().repeat(5, 1)
    masked = apply_top_p(logits, torch.tensor([0.79, 0.81, 0.4, 1.0, 0.999]))
    assert kept(masked) == [{1, 3}, {1, 3, 2}, {1}, {0, 1, 2, 3}, {0, 1, 2, 3}]


def test_top_p_ties_rank_by_token_id_and_keep_at_least_one():
    uniform = torch.zeros(3, 4)  # exactly 0.25 each: the prefix mass is exact
    masked = apply_top_p(uniform, torch.tensor([0.5, 0.51, 1e-6]))
    assert kept(masked) == [{0, 1}, {0, 1, 2}, {0}]
    peaked = torch.tensor([[0.0, 30.0, 0.0]])
    assert kept(apply_top_p(peaked, torch.tensor([0.01]))) == [{1}]


def _reference_top_p(logits: torch.Tensor, p: float) -> set[int]:
    """Plain float64 definition: sort by (prob desc, id asc), keep the shortest prefix reaching p."""
    probs = torch.softmax(logits.double(), dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    out, mass = set(), 0.0
    for i in order:
        if mass >= p:
            break
        out.add(i)
        mass += probs[i]
    return out


def test_top_p_candidate_shortcut_matches_full_definition():
    vocab = 4 * TOP_P_CANDIDATES
    gen = torch.Generator().manual_seed(11)
    peaked = torch.randn(2, vocab, generator=gen) * 6  # mass inside the candidates: shortcut
    flat = torch.randn(2, vocab, generator=gen) * 0.3  # mass spread out: full sort
    tied = torch.randn(1, vocab, generator=gen).round()  # ties across the candidate boundary
    tied[0, :200] = 8.0
    logits = torch.cat([peaked, flat, tied])
    p = torch.tensor([0.9, 0.5, 0.9, 0.3, 0.95])
    got = kept(apply_top_p(logits, p))
    for i in range(len(p)):
        assert got[i] == _reference_top_p(logits[i], float(p[i])), i
    assert len(got[0]) < TOP_P_CANDIDATES < len(got[2])  # both paths were exercised


def test_min_p_drops_below_fraction_of_max():
    probs = torch.tensor([0.3, 0.5, 0.1, 0.09, 0.01])
    logits = probs.log().repeat(3, 1)
    masked = apply_min_p(logits, torch.tensor([0.19, 0.0, 0.7]))
    assert kept(masked) == [{0, 1, 2}, {0, 1, 2, 3, 4}, {1}]
    ties = torch.tensor([[2.0, 2.0, 1.0]])
    assert kept(apply_min_p(ties, torch.tensor([1.0]))) == [{0, 1}]


# -- penalties -------------------------------------------------------------------------------------

LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]
PROMPT, OUTPUT = [0, 4], [1, 1, 2]


def test_token_counts():
    counts = token_counts([[1, 1, 2], [], [0, 5]], 6, "cpu")
    assert counts.tolist() == [[0, 2, 1, 0, 0, 0], [0] * 6, [1, 0, 0, 0, 0, 1]]
    with pytest.raises(ValueError):
        token_counts([[6]], 6, "cpu")


@pytest.mark.parametrize("rep, freq, pres, expected", [
    # repetition over prompt (0, 4) and output (1, 2): positives divided, negatives multiplied
    (2.0, 0.0, 0.0, [1.0, -2.0, 0.25, 3.0, -4.0, 1.0]),
    (0.5, 0.0, 0.0, [4.0, -0.5, 1.0, 3.0, -1.0, 1.0]),
    # frequency: minus freq * count in the output (token 1 twice, token 2 once)
    (1.0, 0.5, 0.0, [2.0, -2.0, 0.0, 3.0, -2.0, 1.0]),
    # presence: minus pres once per distinct output token; the prompt does not count
    (1.0, 0.0, 0.25, [2.0, -1.25, 0.25, 3.0, -2.0, 1.0]),
    (1.0, -1.0, -0.5, [2.0, 1.5, 2.0, 3.0, -2.0, 1.0]),
    # all three, repetition first
    (2.0, 0.5, 0.25, [1.0, -3.25, -0.5, 3.0, -4.0, 1.0]),
])
def test_penalties_follow_the_formula(rep, freq, pres, expected):
    logits = torch.tensor([LOGITS])
    helper = apply_penalties(logits, token_counts([PROMPT], 6, "cpu"), token_counts([OUTPUT], 6, "cpu"),
                             torch.tensor([rep]), torch.tensor([freq]), torch.tensor([pres]))
    assert helper[0].tolist() == expected
    params = SamplingParams(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    plain = row(SamplingParams())
    batch = torch.tensor([LOGITS, LOGITS])
    through = Sampler().penalized_logits(batch, [plain, row(params, PROMPT, OUTPUT)])
    assert through[1].tolist() == expected
    assert through[0].tolist() == LOGITS  # rows without penalties are left alone
    assert batch.tolist() == [LOGITS, LOGITS]


def test_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    greedy = SamplingParams(temperature=0.0)
    assert Sampler()(logits, [row(greedy, output=[0])])[0].token_id == 0
    penalized = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert Sampler()(logits, [row(penalized, output=[0])])[0].token_id == 1


# -- min_tokens ------------------------------------------------------------------------------------

def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 9.0, 8.0, 7.0, 1.0]])  # eos 1 first, stop id 2 second
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2])
    sampler = Sampler()
    picks = [sampler(logits, [row(params, output=[4] * n, eos={1})])[0].token_id for n in range(5)]
    assert picks == [3, 3, 3, 1, 1]
    masked = sampler.penalized_logits(logits, [row(params, output=[4], eos={1})])
    assert masked[0].tolist() == [0.0, NEG_INF, NEG_INF, 7.0, 1.0]
    # ignore_eos: the engine passes no eos ids, but stop_token_ids stay blocked
    assert sampler(logits, [row(params, output=[], eos=())])[0].token_id == 1


def test_min_tokens_applies_to_sampled_rows_too():
    logits = torch.tensor([[5.0, 5.0, 5.0, -50.0]]).repeat(200, 1)
    params = SamplingParams(min_tokens=2, stop_token_ids=[0])
    rows = [row(params, output=[3], eos={1}, seed=i) for i in range(200)]
    assert {t.token_id for t in Sampler()(logits, rows)} == {2}


# -- logprobs --------------------------------------------------------------------------------------

def test_logprobs_come_from_raw_logits():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(2)) * 2
    rows = [row(SamplingParams(temperature=0.6, top_k=20, repetition_penalty=1.5, logprobs=5), output=[1, 2],
                seed=1),
            row(SamplingParams(temperature=0.0, logprobs=0, frequency_penalty=1.0), output=[7]),
            row(SamplingParams(temperature=1.0)),
            row(SamplingParams(temperature=1.0, logprobs=20), seed=3)]
    out = Sampler()(logits, rows)
    ref = torch.log_softmax(logits, dim=-1)
    for i in (0, 1, 3):
        assert out[i].logprob == pytest.approx(ref[i, out[i].token_id].item(), abs=1e-5)
    assert out[1].top_logprobs == []
    assert out[2].logprob is None and out[2].top_logprobs is None
    for i, n in ((0, 5), (3, 20)):
        top = out[i].top_logprobs
        assert len(top) == n
        values = [lp for _, lp in top]
        assert values == sorted(values, reverse=True)
        expected = ref[i].topk(n)
        assert [t for t, _ in top] == expected.indices.tolist()
        assert values == pytest.approx(expected.values.tolist(), abs=1e-5)


# -- distribution ----------------------------------------------------------------------------------

CHI2_DF5_P001 = 20.52  # chi-square critical value, 5 degrees of freedom, p = 0.001


def _chi2(tokens: list[int], probs: list[float]) -> float:
    n = len(tokens)
    counts = [tokens.count(i) for i in range(len(probs))]
    assert all(c == 0 for c, p in zip(counts, probs) if p == 0.0)  # masked tokens never appear
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


BASE = [1.0, 0.5, 0.0, -0.5, -1.0, 2.0]


@pytest.mark.parametrize("params, probs", [
    (SamplingParams(temperature=1.0), torch.softmax(torch.tensor(BASE), 0).tolist()),
    (SamplingParams(temperature=0.5), torch.softmax(torch.tensor(BASE) / 0.5, 0).tolist()),
])
def test_unseeded_batch_matches_softmax(params, probs):
    n = 20000
    torch.manual_seed(0)
    tokens = [t.token_id for t in Sampler()(torch.tensor([BASE]).repeat(n, 1), [row(params)] * n)]
    assert _chi2(tokens, probs) < CHI2_DF5_P001


def test_seeded_draws_match_renormalised_top_k():
    # top_k=3 keeps tokens 5, 0, 1; their renormalised softmax is the target
    e = [math.exp(x) for x in BASE]
    keep = {5, 0, 1}
    z = sum(e[i] for i in keep)
    probs = [e[i] / z if i in keep else 0.0 for i in range(6)]
    r = row(SamplingParams(top_k=3), seed=42)
    sampler, logits = Sampler(), torch.tensor([BASE])
    tokens = [sampler(logits, [r])[0].token_id for _ in range(3000)]
    counts = [tokens.count(i) for i in range(6)]
    stat = sum((c - 3000 * p) ** 2 / (3000 * p) for c, p in zip(counts, probs) if p > 0)
    assert stat < 13.82  # 2 degrees of freedom, p = 0.001
    assert counts[2] == counts[3] == counts[4] == 0


# -- scale -----------------------------------------------------------------------------------------

def test_glm_sized_mixed_batch():
    batch, vocab = 256, 151_552
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(9)) * 4
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=40),
             SamplingParams(temperature=0.9, top_p=0.9, min_p=0.05, repetition_penalty=1.1, logprobs=2),
             SamplingParams(temperature=1.0, presence_penalty=0.5, min_tokens=4)]
    rows = [row(kinds[i % 4], prompt=range(i, i + 200), output=range(i, i + 3), seed=i if i % 3 else None,
                eos={151_329}) for i in range(batch)]
    out = Sampler()(logits, rows)
    assert len(out) == batch and all(isinstance(t, SampledToken) for t in out)
    argmax = logits.argmax(dim=-1)
    top40 = logits.topk(40, dim=-1).indices
    for i, t in enumerate(out):
        if i % 4 == 0:
            assert t.token_id == argmax[i].item()
        elif i % 4 == 1:
            assert t.token_id in top40[i].tolist()
        elif i % 4 == 3:
            assert t.token_id != 151_329
    # a seeded row gives the same token alone as inside the full batch
    again = row(kinds[1], prompt=range(5, 205), output=range(5, 8), seed=5)
    assert Sampler()(logits[5:6], [again])[0].token_id == out[5].token_id


def test_cpu_argmax_through_numpy_equals_torch_argmax():
    """Ties go to the first index and NaN wins, as torch's argmax does; strided views work too."""
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(64, 300, generator=g), torch.zeros(4, 9), torch.zeros(7).expand(5, -1),
             torch.tensor([[1.0, float("nan"), 2.0], [3.0, 3.0, 1.0], [float("-inf"), float("-inf"), -1.0]]),
             torch.randn(6, 10, generator=g)[:, ::2]]
    for x in cases:
        got = argmax_rows(x)
        assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))
