"""Sampler: allowed sets of top_k/top_p/min_p computed independently, exact penalty effects, seeded rows that do
not depend on the batch, greedy = argmax, min_tokens, raw logprobs."""

import math

import pytest
import torch

import glm4.engine.sampler as sampler_mod
from glm4.engine.sampler import Sampler, _sample_filtered, apply_penalties
from glm4.engine.sampling_params import SamplingParams
from glm4.engine.sequence import Sequence

V = 64
STOP_IDS = (1, 2, 3)


def seq(prompt=(5, 6, 7), output=(), index=0, **params):
    s = Sequence("r", list(prompt), SamplingParams(**params).validate(), index=index, eos_token_ids=STOP_IDS)
    for t in output:
        s.append_token(t)
    return s


def rand_logits(n, seed=0, scale=3.0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


def draws(logits_row, n=400, **params):
    """n independent unseeded samples from one logits row."""
    seqs = [seq(**params) for _ in range(n)]
    return set(Sampler(seed=0)(logits_row.expand(n, V).clone(), seqs).token_ids)


@pytest.fixture(params=[1024, 8], ids=["full", "candidates"])
def candidates(request, monkeypatch):
    """Run filter tests both with every token a candidate and with 8 candidates (exact-or-redo path)."""
    monkeypatch.setattr(sampler_mod, "CANDIDATES", request.param)
    return request.param


def allowed_top_k(row, k):
    return set(torch.argsort(row, descending=True)[:k].tolist())


def allowed_top_p(row, p, temperature=1.0):
    """Smallest top set with mass >= p, in float64; tokens within 1e-5 of the boundary may go either way."""
    probs = torch.softmax(row.double() / temperature, -1)
    order = torch.argsort(probs, descending=True).tolist()
    must, may, mass = set(), set(), 0.0
    for t in order:
        if mass < p - 1e-5:
            must.add(t)
        elif mass < p + 1e-5:
            may.add(t)
        mass += probs[t].item()
    return must, must | may


def allowed_min_p(row, min_p, temperature=1.0):
    probs = torch.softmax(row.double() / temperature, -1)
    return set(torch.nonzero(probs >= min_p * probs.max()).flatten().tolist())


def test_greedy_is_argmax_whatever_the_other_rows():
    logits = rand_logits(6)
    params = [dict(temperature=0), dict(temperature=1.0), dict(temperature=0), dict(top_k=3),
              dict(temperature=0, top_k=2, top_p=0.1), dict(seed=4)]
    out = Sampler()(logits, [seq(**p) for p in params]).token_ids
    argmax = logits.argmax(-1).tolist()
    assert [out[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_leaves_the_top_k(k, candidates):
    row = rand_logits(1, seed=k)[0]
    got = draws(row, top_k=k)
    assert got <= allowed_top_k(row, k), got - allowed_top_k(row, k)
    assert k == 1 or len(got) > 1, "sampling collapsed to one token"


@pytest.mark.parametrize("p,temperature", [(0.1, 1.0), (0.5, 1.0), (0.9, 0.7), (0.95, 2.0)])
def test_top_p_never_leaves_the_nucleus(p, temperature, candidates):
    row = rand_logits(1, seed=int(p * 100))[0]
    got = draws(row, top_p=p, temperature=temperature)
    must, may = allowed_top_p(row, p, temperature)
    assert got <= may, sorted(got - may)
    assert must <= allowed_top_k(row, len(may))


@pytest.mark.parametrize("min_p,temperature", [(0.05, 1.0), (0.3, 1.0), (0.1, 0.5)])
def test_min_p_never_emits_improbable_tokens(min_p, temperature, candidates):
    row = rand_logits(1, seed=7)[0]
    got = draws(row, min_p=min_p, temperature=temperature)
    allowed = allowed_min_p(row, min_p, temperature)
    assert got <= allowed, sorted(got - allowed)


def test_combined_filters_apply_in_order_min_p_top_k_top_p(candidates):
    row = rand_logits(1, seed=11, scale=1.0)[0]
    got = draws(row, n=600, min_p=0.02, top_k=20, top_p=0.8)
    # Independent computation of the same chain: min_p, then top_k, then top_p on the renormalised remainder.
    keep = allowed_min_p(row, 0.02) & allowed_top_k(row, 20)
    masked = torch.full_like(row, float("-inf"))
    masked[list(keep)] = row[list(keep)]
    _, may = allowed_top_p(masked, 0.8)
    assert got <= may and len(got) > 1


def test_candidate_shortcut_equals_full_vocabulary_filtering():
    """The top-candidates path must pick exactly the token the full-vocabulary path picks for the same uniform."""
    n = 300
    x = rand_logits(n, seed=21, scale=2.0)
    gen = torch.Generator().manual_seed(0)
    choices = [dict(top_p=0.3), dict(top_p=0.9), dict(min_p=0.2), dict(min_p=0.01), dict(top_k=5, top_p=0.7),
               dict(top_k=20), dict(min_p=0.05, top_p=0.95)]
    seqs = [seq(**choices[i % len(choices)]) for i in range(n)]
    u = torch.rand(n, generator=gen)
    assert torch.equal(_sample_filtered(x, seqs, u, 8), _sample_filtered(x, seqs, u, V))


def test_sampling_follows_the_distribution():
    logits = torch.full((1, V), -1e9)
    logits[0, :4] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    n = 8000
    ids = Sampler(seed=1)(logits.expand(n, V).clone(), [seq() for _ in range(n)]).token_ids
    freq = torch.bincount(torch.tensor(ids), minlength=V)[:4].double() / n
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.double), atol=0.02), freq


def test_seeded_rows_do_not_depend_on_the_batch():
    steps = 12
    row_logits = [rand_logits(1, seed=100 + t)[0] for t in range(steps)]

    def run(batch_builder):
        s = seq(seed=1234, temperature=0.9, top_p=0.95)
        sampler, toks = Sampler(seed=99), []
        for t in range(steps):
            others = batch_builder(t)
            logits = torch.cat([rand_logits(len(others), seed=500 + t), row_logits[t][None]]) if others \
                else row_logits[t][None].clone()
            tok = sampler(logits, others + [s]).token_ids[-1]
            s.append_token(tok)
            toks.append(tok)
        return toks

    alone = run(lambda t: [])
    crowded = run(lambda t: [seq(seed=7), seq(), seq(temperature=0)] * (1 + t % 3))
    other_unseeded = run(lambda t: [seq(top_k=5) for _ in range(t % 4)])
    assert alone == crowded == other_unseeded
    # A different seed, or another sample index of the same request (seed + index), gives another stream.
    s2 = seq(seed=1234, temperature=0.9, top_p=0.95, index=1)
    other = [Sampler()(row_logits[t][None].clone(), [s2]).token_ids[0] for t in range(steps)]
    assert other != alone


@pytest.mark.parametrize("seed", [-1, 2**64 - 1, 10**30])
def test_any_integer_seed_works(seed):
    s = seq(seed=seed, n=2, index=1)
    assert Sampler()(rand_logits(1), [s]).token_ids[0] in range(V)


def test_repetition_penalty_changes_exactly_the_seen_tokens():
    logits = rand_logits(2, seed=3)
    prompt, output = [4, 9, 9], [12, 4, 30]
    s = seq(prompt=prompt, output=output, repetition_penalty=1.5)
    plain = seq(prompt=prompt, output=output)
    processed = logits.clone()
    apply_penalties(processed, [s, plain])
    expected = logits[0].clone()
    for t in set(prompt + output):
        x = logits[0, t].item()
        expected[t] = x / 1.5 if x > 0 else x * 1.5
    assert torch.allclose(processed[0], expected)
    assert torch.equal(processed[1], logits[1]), "a row without penalties must be untouched"


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = rand_logits(1, seed=4)
    s = seq(prompt=[7, 8, 8], output=[8, 20, 20, 20], presence_penalty=0.5, frequency_penalty=0.25)
    processed = logits.clone()
    apply_penalties(processed, [s])
    expected = logits[0].clone()
    expected[8] -= 0.5 + 0.25 * 1  # once in the output (prompt occurrences do not count)
    expected[20] -= 0.5 + 0.25 * 3
    assert torch.allclose(processed[0], expected)
    changed = torch.nonzero(processed[0] != logits[0]).flatten().tolist()
    assert changed == [8, 20]


def test_greedy_sees_penalties():
    logits = torch.zeros(1, V)
    logits[0, 10], logits[0, 11] = 2.0, 1.9
    s = seq(output=[10], temperature=0, repetition_penalty=1.2)
    assert Sampler()(logits, [s]).token_ids == [11]


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(1, V)
    logits[:, 2], logits[:, 1], logits[:, 40] = 100.0, 90.0, 50.0  # stop ids dominate
    early = seq(output=[20], temperature=0, min_tokens=2)
    done = seq(output=[20, 21], temperature=0, min_tokens=2)
    ignoring = seq(output=[20], temperature=0, min_tokens=2, ignore_eos=True)  # defaults do not stop it anyway
    assert Sampler()(logits.expand(3, V).clone(), [early, done, ignoring]).token_ids == [40, 2, 2]


def test_logprobs_are_raw_top_k_plus_the_sampled_token():
    logits = rand_logits(3, seed=5)
    seqs = [seq(temperature=0.5, top_k=2, logprobs=3, repetition_penalty=1.3, output=[1]), seq(logprobs=0),
            seq(temperature=0)]
    out = Sampler()(logits, seqs)
    raw = torch.log_softmax(logits, -1)
    d0 = out.logprobs[0]
    top3 = torch.topk(raw[0], 3).indices.tolist()
    assert set(d0) == set(top3) | {out.token_ids[0]}
    for t, lp in d0.items():
        assert lp == pytest.approx(raw[0, t].item(), abs=1e-5), "logprobs must come from the unprocessed logits"
    assert list(out.logprobs[1]) == [out.token_ids[1]]
    assert out.logprobs[2] is None
    assert math.isclose(out.logprobs[1][out.token_ids[1]], raw[1, out.token_ids[1]].item(), abs_tol=1e-5)


def test_vocab_padding_rows_are_never_sampled():
    logits = torch.zeros(1, V)
    logits[0, V - 1] = 50.0
    assert Sampler(vocab_size=V - 4)(logits, [seq(temperature=0)]).token_ids[0] < V - 4
