import pytest

from glmserve.engine.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs) == (None, 16, 0, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.ignore_eos and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.include_stop_str_in_output
    assert not p.greedy


def test_vllm_style_construction():
    p = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    assert p.greedy and p.max_tokens == 32 and p.ignore_eos


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(5, 7)).stop_token_ids == [5, 7]
    assert SamplingParams(top_k=-1).top_k == 0


def test_greedy_threshold_and_reset_of_truncation():
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.1)
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    # sampled requests keep them
    q = SamplingParams(temperature=0.7, top_p=0.5, top_k=5, min_p=0.1)
    assert (q.top_p, q.top_k, q.min_p) == (0.5, 5, 0.1)


def test_plain_mutable_dataclass_and_deep_clone():
    p = SamplingParams(stop=["x"], stop_token_ids=[3], seed=1)
    p.max_tokens = 99  # mutable, like vLLM's
    c = p.clone()
    assert c == p and c is not p
    c.stop.append("y")
    c.stop_token_ids.append(4)
    c.seed = 2
    assert p.stop == ["x"] and p.stop_token_ids == [3] and p.seed == 1 and p.max_tokens == 99


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(top_p=1.0), dict(top_p=1e-3), dict(top_k=1), dict(min_p=0.0), dict(min_p=1.0),
    dict(repetition_penalty=0.01), dict(presence_penalty=-2.0), dict(presence_penalty=2.0),
    dict(frequency_penalty=-2.0), dict(frequency_penalty=2.0), dict(max_tokens=None), dict(max_tokens=1),
    dict(min_tokens=16, max_tokens=16), dict(min_tokens=50, max_tokens=None), dict(logprobs=0),
    dict(logprobs=20), dict(n=4), dict(seed=0),
])
def test_boundary_values_are_accepted(kwargs):
    p = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        if not (p.greedy and key in ("top_p", "top_k", "min_p")):
            assert getattr(p, key) == value


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.01), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(presence_penalty=2.1), "presence_penalty"),
    (dict(presence_penalty=-2.1), "presence_penalty"),
    (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-5), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=17, max_tokens=16), "min_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
    (dict(n=0), "n"),
    (dict(seed=1.5), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop=[1]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        SamplingParams(**kwargs)
