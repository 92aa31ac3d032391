"""SamplingParams: vLLM defaults, normalisation, and validate() errors that name the field."""

import pytest

from glm4.engine.sampling_params import SamplingParams


def test_defaults_match_design():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == (None, 16, 0, None, None)
    assert (p.ignore_eos, p.logprobs, p.skip_special_tokens) == (False, None, True)
    assert p.validate() is p


def test_stop_string_is_normalised_to_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_temperature_zero_is_greedy():
    assert SamplingParams(temperature=0).validate().is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0), dict(top_k=0), dict(top_k=-1), dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0),
    dict(logprobs=0), dict(logprobs=20), dict(presence_penalty=-2), dict(frequency_penalty=2),
    dict(min_tokens=16, max_tokens=16), dict(stop_token_ids=[]), dict(stop=["x", "yz"]), dict(seed=0),
    dict(n=4, seed=123, repetition_penalty=1.3),
])
def test_valid_edges(kwargs):
    SamplingParams(**kwargs).validate()


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("n", True), ("temperature", -0.1), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 2.0), ("min_p", -0.1), ("min_p", 1.1),
    ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3), ("seed", 1.5),
    ("max_tokens", 0), ("max_tokens", None), ("min_tokens", -1), ("min_tokens", 17), ("stop", [""]),
    ("stop", [1]), ("stop_token_ids", [-1]), ("stop_token_ids", "1"), ("ignore_eos", 1),
    ("logprobs", 21), ("logprobs", -1), ("skip_special_tokens", "yes"),
])
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value}).validate()
    assert str(err.value).startswith(field + " must be"), str(err.value)
