"""Sampler: kept sets of min_p/top_k/top_p equal a full-sort reference on both paths (candidates and radix select),
inverse-CDF draws follow the weights, penalties equal a Counter-based reference across steps (slot reuse,
preemption), seeded rows that do not depend on the batch, greedy = argmax, min_tokens, raw logprobs."""

import math
from collections import Counter

import pytest
import torch

import glm4.engine.filters as filters
import glm4.engine.sampler as sampler_mod
from glm4.engine.penalties import PenaltyState, has_penalty
from glm4.engine.rng import uniforms
from glm4.engine.sampler import Sampler, _argmax_chunked
from glm4.engine.sampling_params import SamplingParams
from glm4.engine.sequence import Sequence

V = 64
STOP_IDS = (1, 2, 3)


def seq(prompt=(5, 6, 7), output=(), index=0, slot=None, **params):
    s = Sequence("r", list(prompt), SamplingParams(**params).validate(), index=index, eos_token_ids=STOP_IDS)
    for t in output:
        s.append_token(t)
    s.slot = slot
    return s


def rand_logits(n, seed=0, scale=3.0, vocab=V):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def frequencies(logits_row, n=500, **params):
    """The sampler's token frequencies over n copies of one logits row, with the uniforms on a grid ((i + 0.5) / n)
    instead of random: the sampled distribution up to 1 / n per token, deterministically."""
    sampler = Sampler()
    sampler.uniforms = lambda seqs, device: (torch.arange(len(seqs), device=device) + 0.5) / len(seqs)
    ids = sampler(logits_row.expand(n, V).clone(), [seq(**params) for _ in range(n)]).token_ids
    return torch.bincount(torch.tensor(ids), minlength=V).double() / n


@pytest.fixture(params=[(64, 256), (3, 12), (2,)], ids=["candidates", "tiers", "radix"])
def candidates(request, monkeypatch):
    """Run a test with the default candidate counts (every row of a 64-token vocabulary settles there), with 3 then
    12 candidates (rows spread over both counts and the radix path), and with 2 only (most rows take the radix
    path)."""
    monkeypatch.setattr(filters, "CANDIDATES", request.param)
    return request.param


# ---- kept sets against a full sort --------------------------------------------------------------------------------
def reference_kept(p, min_p, top_k, top_p, tol=1e-5):
    """Full-sort reference in float64 of vLLM's chain (min_p, then top_k, then top_p): masks [n, V] of the tokens
    that must be kept and that may be kept (mass above them within tol of the top_p boundary). top_p keeps a token iff
    the mass strictly above it is < top_p (FlashInfer's rule, so a tie at the boundary is kept whole; vLLM's sort-based
    path keeps as many tied tokens as its sort order reaches)."""
    p = p.double()
    p = torch.where(p >= min_p.double().unsqueeze(1) * p.amax(1, keepdim=True), p, 0.0)
    sorted_p, order = p.sort(1, descending=True)
    kth = sorted_p.gather(1, (top_k - 1).clamp(min=0).unsqueeze(1))
    p = torch.where((top_k.unsqueeze(1) > 0) & (p < kth), 0.0, p)
    mass = p.sum(1, keepdim=True)
    in_order = p.gather(1, order)
    before = in_order.cumsum(1) - in_order
    # the mass strictly above a token: `before` at the first token of its tie group
    pos = torch.arange(p.shape[1]).expand_as(p)
    new_group = torch.ones_like(p, dtype=torch.bool)
    new_group[:, 1:] = in_order[:, 1:] != in_order[:, :-1]
    above = before.gather(1, torch.where(new_group, pos, 0).cummax(1).values)
    target, off = top_p.double().unsqueeze(1) * mass, (top_p.unsqueeze(1) >= 1)
    must = torch.zeros_like(p, dtype=torch.bool).scatter(1, order, off | (above < target - tol * mass))
    may = torch.zeros_like(p, dtype=torch.bool).scatter(1, order, off | (above < target + tol * mass))
    return must & (p > 0), may & (p > 0)


def filter_case(scale, n=32, vocab=5000, seed=0, step=0.0):
    """Softmax rows in a padded workspace layout and a spread of min_p / top_k / top_p settings. step > 0 rounds
    the logits to multiples of it: ties everywhere, as bf16 logits have."""
    width = filters.padded_width(vocab)
    x = torch.full((n, width), float("-inf"))
    x[:, :vocab] = rand_logits(n, seed=seed, scale=scale, vocab=vocab)
    if step:
        x[:, :vocab] = (x[:, :vocab] / step).round() * step
    p = torch.softmax(x, 1)
    min_p = torch.tensor([0.0] * 16 + [0.001, 0.01, 0.2, 0.05, 0.0001, 0.3, 0.02, 0.1] * 2)[:n]
    top_k = torch.tensor([0, 5, 50, 64, 65, 200, 3000, 0, 1, 0, 20, 0, 7, 0, 500, 0] * 2)[:n]
    top_p = torch.tensor([0.8, 1.0, 0.9, 0.5, 0.99, 0.3, 0.95, 1.0, 0.7, 0.05, 1.0, 0.6, 0.9, 0.999, 0.2, 1.0] * 2)[:n]
    return p, min_p, top_k, top_p


def assert_kept(kept, must, may):
    assert not (must & ~kept).any(), "a token the reference keeps was dropped"
    assert not (kept & ~may).any(), "a token the reference drops was kept"


@pytest.mark.parametrize("step", [0.0, 0.25], ids=["distinct", "ties"])
@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 8.0])
def test_radix_path_keeps_exactly_the_reference_set(scale, step):
    p, min_p, top_k, top_p = filter_case(scale, step=step)
    must, may = reference_kept(p, min_p, top_k, top_p)
    w = p.clone()
    filters.fallback_sample(w, p.sum(1), min_p, top_k, top_p, torch.rand(len(p)), filters.RadixBuffers(),
                            True, True, True)
    assert_kept(w > 0, must, may)
    assert torch.equal(w[w > 0], p[w > 0]), "kept tokens keep their probability"


@pytest.mark.parametrize("step", [0.0, 0.25], ids=["distinct", "ties"])
@pytest.mark.parametrize("k", [64, 256])
@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 8.0])
def test_candidate_path_is_exact_where_it_says_so(scale, k, step):
    p, min_p, top_k, top_p = filter_case(scale, step=step)
    must, may = reference_kept(p, min_p, top_k, top_p)
    rows = torch.arange(len(p))
    c, cols, b = filters.top_candidates(p, p.view(len(p), -1, filters.CHUNK).sum(2), k, rows)
    tau, exact = filters.candidate_thresholds(c, b, p.sum(1), min_p, top_k, top_p)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter(1, cols, (c >= tau.unsqueeze(1)) & (c > 0))
    assert_kept(kept[exact], must[exact], may[exact])
    if scale >= 3:  # peaked rows settle among the candidates: the fast path is really taken
        assert exact.sum() >= len(p) // 2, int(exact.sum())


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 8.0])
def test_rows_skipping_the_wider_candidates_could_not_have_settled_there(scale):
    p, min_p, top_k, top_p = filter_case(scale)
    rows, sums, z = torch.arange(len(p)), p.view(len(p), -1, filters.CHUNK).sum(2), p.sum(1)
    narrow = filters.top_candidates(p, sums, 16, rows)
    skip = ~filters.candidate_thresholds(*narrow[::2], z, min_p, top_k, top_p)[1] & \
        ~filters.could_settle(*narrow[::2], z, min_p, top_k, top_p, 256)
    wide = filters.top_candidates(p, sums, 256, rows)
    assert not (skip & filters.candidate_thresholds(*wide[::2], z, min_p, top_k, top_p)[1]).any()
    if scale <= 1:  # flat rows skip the wider search
        assert skip.sum() >= 4, int(skip.sum())


def test_candidates_are_the_top_of_the_row_and_bound_the_rest():
    p = torch.softmax(rand_logits(8, seed=3, scale=2.0, vocab=4096), 1)
    c, cols, b = filters.top_candidates(p, p.view(8, -1, filters.CHUNK).sum(2), 64, torch.arange(8))
    top = p.topk(64, 1)
    above = c > b.unsqueeze(1)  # every token above the bound is a candidate, in order
    assert torch.equal(c[above], top.values[above]) and torch.equal(cols[above], top.indices[above])
    rest = p.scatter(1, cols, 0.0)
    assert (rest.amax(1) <= b).all()


def test_draws_follow_the_weights_on_a_grid_of_uniforms():
    """Inverse CDF: a uniform grid of u lands on each token in proportion to its weight (zero weights never)."""
    w = torch.softmax(rand_logits(3, seed=8, scale=1.5, vocab=1000), 1)
    w[:, ::7] = 0.0
    w = torch.cat([w, torch.zeros(3, filters.padded_width(1000) - 1000)], 1)
    grid = 5000
    u = (torch.arange(grid) + 0.5) / grid
    expected = (w / w.sum(1, keepdim=True)).double()
    for r in range(3):
        rows = w[r].expand(grid, -1).contiguous()
        for drawn in (filters.sample_chunked(rows.clone(), u), filters.sample_weights(rows, u)):
            freq = torch.bincount(drawn, minlength=w.shape[1]).double() / grid
            assert (freq[w[r] == 0] == 0).all()
            assert torch.allclose(freq, expected[r], atol=1.5 / grid)


# ---- the sampler end to end ---------------------------------------------------------------------------------------
def test_greedy_is_argmax_whatever_the_other_rows():
    logits = rand_logits(6)
    params = [dict(temperature=0), dict(temperature=1.0), dict(temperature=0), dict(top_k=3),
              dict(temperature=0, top_k=2, top_p=0.1), dict(seed=4)]
    out = Sampler()(logits, [seq(**p) for p in params]).token_ids
    argmax = logits.argmax(-1).tolist()
    assert [out[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


def test_chunked_argmax_takes_the_first_maximum_and_nan():
    width = filters.padded_width(V)
    x = torch.full((4, width), float("-inf"))
    x[:, :V] = rand_logits(4, seed=2)
    x[0, 40] = x[0, 3] = 100.0  # tie across chunks: the first wins
    x[1, 33] = x[1, 34] = 100.0  # tie inside a chunk
    x[2, 50] = float("nan")  # NaN counts as the maximum, as in torch.argmax
    assert _argmax_chunked(x).tolist() == x.argmax(1).tolist() == [3, 33, 50, int(x[3].argmax())]


def test_nan_logits_still_give_a_token_of_the_vocabulary(candidates):
    logits = rand_logits(3)
    logits[0] = float("nan")
    logits[1, 10] = float("nan")
    out = Sampler()(logits, [seq(top_p=0.9), seq(top_k=5), seq(temperature=0)]).token_ids
    assert all(0 <= t < V for t in out)


@pytest.mark.parametrize("params", [dict(top_k=1), dict(top_k=3), dict(top_k=10), dict(top_p=0.3),
                                    dict(top_p=0.9, temperature=0.7), dict(min_p=0.1), dict(temperature=1.3),
                                    dict(min_p=0.02, top_k=20, top_p=0.8), dict(top_k=40, top_p=0.95, temperature=2.0)])
def test_sampled_distribution_equals_the_full_sort_reference(params, candidates):
    row = rand_logits(1, seed=11, scale=1.5)[0]
    n = 500
    p = torch.softmax(row.double() / params.get("temperature", 1.0), -1).unsqueeze(0)
    must, may = reference_kept(p, torch.tensor([params.get("min_p", 0.0)]), torch.tensor([params.get("top_k", 0)]),
                               torch.tensor([params.get("top_p", 1.0)]))
    assert torch.equal(must, may), "no token of this row sits on a boundary"
    expected = (p * must)[0] / (p * must).sum()
    assert torch.allclose(frequencies(row, n, **params), expected, atol=1.0 / n)


@pytest.mark.parametrize("params,probs", [(dict(), [0.1, 0.2, 0.3, 0.4]),
                                          (dict(top_p=0.65), [0.0, 0.0, 3 / 7, 4 / 7]),
                                          (dict(top_k=3, top_p=0.6), [0.0, 0.0, 3 / 7, 4 / 7]),
                                          (dict(min_p=0.5), [0.0, 0.0, 3 / 7, 4 / 7])])
def test_sampling_follows_the_filtered_distribution(params, probs, candidates):
    logits = torch.full((1, V), -1e9)
    logits[0, :4] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    freq = frequencies(logits[0], 700, **params)
    assert torch.allclose(freq[:4], torch.tensor(probs, dtype=torch.double), atol=1.0 / 700) and freq[:4].sum() == 1


def test_sampling_with_random_uniforms_covers_the_distribution():
    """The real uniforms (counter-based hash) draw like the grid: frequencies near the probabilities."""
    logits = torch.full((1, V), -1e9)
    logits[0, :4] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    n = 4000
    ids = Sampler(seed=1)(logits.expand(n, V).clone(), [seq() for _ in range(n)]).token_ids
    freq = torch.bincount(torch.tensor(ids), minlength=V)[:4].double() / n
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.double), atol=0.025), freq


def test_seeded_rows_do_not_depend_on_the_batch(candidates):
    steps = 12
    row_logits = [rand_logits(1, seed=100 + t, scale=0.5 + t % 3)[0] for t in range(steps)]

    def run(batch_builder, params=dict(seed=1234, temperature=0.9, top_p=0.95)):
        s = seq(**params)
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
    crowded = run(lambda t: [seq(seed=7), seq(), seq(temperature=0), seq(top_k=40, top_p=0.5)] * (1 + t % 3))
    other_unseeded = run(lambda t: [seq(top_k=5) for _ in range(t % 4)])
    assert alone == crowded == other_unseeded
    # A different seed, or another sample index of the same request (seed + index), gives another stream.
    assert run(lambda t: [], dict(seed=1234, temperature=0.9, top_p=0.95, index=1)) != alone
    assert run(lambda t: [], dict(seed=1235, temperature=0.9, top_p=0.95)) != alone


def test_the_accelerator_strategy_draws_the_same_tokens(monkeypatch):
    """On an accelerator every sampled row goes through every path and `where` keeps its first exact draw; on CPU
    only unsettled rows go on. Since a row's path depends on the row alone, the tokens are the same."""
    monkeypatch.setattr(filters, "CANDIDATES", (3, 12))
    logits = torch.cat([rand_logits(5, seed=1, scale=8.0), rand_logits(5, seed=2, scale=0.3)])
    params = [dict(top_p=0.9), dict(top_k=5), dict(temperature=0), dict(min_p=0.1, top_p=0.5), dict(top_k=30),
              dict(top_p=0.95), dict(), dict(top_k=2, top_p=0.3), dict(temperature=0), dict(min_p=0.05)]

    def run():
        return Sampler(seed=5)(logits, [seq(seed=i, **p) for i, p in enumerate(params)]).token_ids

    on_cpu = run()
    monkeypatch.setattr(sampler_mod, "_pending_rows", lambda pending: torch.arange(pending.shape[0]))
    assert run() == on_cpu


@pytest.mark.parametrize("seed", [-1, 2**64 - 1, 10**30])
def test_any_integer_seed_works(seed):
    s = seq(seed=seed, n=2, index=1)
    assert Sampler()(rand_logits(1), [s]).token_ids[0] in range(V)


def test_counter_uniforms_are_reproducible_and_uniform():
    keys, counters = [7] * 5000 + [8] * 5000, list(range(5000)) * 2
    u = uniforms(keys, counters)
    assert (uniforms(keys, counters) == u).all()
    assert ((u >= 0) & (u < 1)).all() and abs(float(u.mean()) - 0.5) < 0.01
    hist = torch.bincount(torch.from_numpy(u * 10).long(), minlength=10)
    assert (hist > 900).all() and (hist < 1100).all()
    assert not (u[:5000] == u[5000:]).any(), "another key gives another stream"


# ---- penalties ----------------------------------------------------------------------------------------------------
def reference_penalised(logits_row, s):
    """vLLM: repetition over prompt + output, then OpenAI frequency / presence over the output (Counters)."""
    x, p = logits_row.clone(), s.params
    for t in set(s.token_ids):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(s.output_token_ids).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


class PenaltySteps:
    """Drives a PenaltyState the way the sampler does: prepare, apply to a padded copy, record, commit, append."""

    def __init__(self, max_num_seqs=4):
        self.state = PenaltyState(max_num_seqs)

    def step(self, seqs, logits, sampled, appended=True, scale=1.0, committed=True):
        width = filters.padded_width(V)
        xs = torch.full((len(seqs), width), float("-inf"))
        xs[:, :V] = logits * scale  # the sampler scales by 1 / temperature while copying
        rows = [i for i, s in enumerate(seqs) if has_penalty(s)]
        step = self.state.prepare(seqs, rows, V, xs.device)
        self.state.apply(xs, step, torch.full((len(seqs), 1), scale))
        nums = self.state.record(step, torch.tensor(sampled)).tolist()
        if committed:
            self.state.commit(seqs, rows, nums)
        if appended:
            for s, t in zip(seqs, sampled):
                s.append_token(t)
        return xs[:, :V]


def check_step(steps, seqs, sampled, seed, **kw):
    logits = rand_logits(len(seqs), seed=seed)
    expected = torch.stack([reference_penalised(logits[i], s) if has_penalty(s) else logits[i]
                            for i, s in enumerate(seqs)])
    got = steps.step(seqs, logits, sampled, **kw)
    assert torch.allclose(got, expected * kw.get("scale", 1.0), atol=1e-5), (got - expected).abs().max()


PEN = dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25)


def test_penalties_follow_the_reference_across_steps_slot_reuse_and_preemption():
    steps = PenaltySteps()
    a = seq(prompt=[4, 9, 9, 12], slot=0, **PEN)
    b = seq(prompt=[20, 21], output=[22, 22], slot=1, repetition_penalty=1.2)
    plain = seq(prompt=[4, 5], slot=2)
    check_step(steps, [a, b, plain], [9, 22, 4], seed=1)  # a repeats a prompt token, b an output token
    check_step(steps, [a, b, plain], [30, 31, 5], seed=2)
    check_step(steps, [a, b, plain], [30, 22, 6], seed=3, scale=2.0)  # tempered logits: penalties scale too
    # b finishes; a new sequence takes slot 1 and must not inherit b's counts
    c = seq(prompt=[22, 40], output=[41], slot=1, frequency_penalty=0.7)
    check_step(steps, [a, c], [9, 41], seed=4)
    # a is preempted; d uses slot 0 meanwhile; a comes back in slot 3 and later in slot 0 again
    a.slot, d = None, seq(prompt=[50, 51, 9], slot=0, presence_penalty=1.0)
    check_step(steps, [d, c], [50, 9], seed=5)
    a.slot = 3
    check_step(steps, [d, a, c], [52, 30, 9], seed=6)
    a.slot, d.slot = 0, None
    check_step(steps, [a, c], [12, 41], seed=7)
    # preempted and back in its own slot with nobody in between: the statistics are still valid
    a.slot = None
    check_step(steps, [c], [40], seed=8)
    a.slot = 0
    check_step(steps, [a, c], [33, 40], seed=9)
    # a step whose token was never appended (aborted mid-step) leaves a stale slot, rebuilt next time
    check_step(steps, [a], [44], seed=10, appended=False)
    check_step(steps, [a, c], [45, 41], seed=11)
    # a step that failed after counting its tokens and before they came back (never committed nor appended)
    check_step(steps, [a, c], [46, 47], seed=12, appended=False, committed=False)
    check_step(steps, [a, c], [46, 41], seed=13)


def test_penalty_state_grows_past_its_initial_width():
    steps = PenaltySteps(max_num_seqs=2)
    big = seq(prompt=list(range(V)) * 5, slot=1, **PEN)  # every token seen
    small = seq(prompt=[3], slot=0, **PEN)
    check_step(steps, [small, big], [4, 5], seed=1)
    check_step(steps, [small, big], [4, 63], seed=2)


def test_repetition_penalty_changes_exactly_the_seen_tokens():
    logits = rand_logits(2, seed=3)
    s = seq(prompt=[4, 9, 9], output=[12, 4, 30], slot=0, repetition_penalty=1.5)
    plain = seq(prompt=[4, 9, 9], output=[12, 4, 30], slot=1)
    got = PenaltySteps().step([s, plain], logits, [0, 0])
    changed = torch.nonzero(got[0] != logits[0]).flatten().tolist()
    assert changed == [4, 9, 12, 30]
    assert torch.equal(got[1], logits[1]), "a row without penalties must be untouched"


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = rand_logits(1, seed=4)
    s = seq(prompt=[7, 8, 8], output=[8, 20, 20, 20], slot=0, presence_penalty=0.5, frequency_penalty=0.25)
    got = PenaltySteps().step([s], logits, [0])
    expected = logits[0].clone()
    expected[8] -= 0.5 + 0.25 * 1  # once in the output (prompt occurrences do not count)
    expected[20] -= 0.5 + 0.25 * 3
    assert torch.allclose(got[0], expected)
    assert torch.nonzero(got[0] != logits[0]).flatten().tolist() == [8, 20]


def test_greedy_rows_see_penalties_step_after_step():
    """End to end: a greedy penalised row picks the argmax of the reference-penalised logits at every step, while
    its slot is shared out and rebuilt."""
    sampler = Sampler(max_num_seqs=4)
    s = seq(prompt=[10, 11, 12], slot=2, temperature=0, **PEN)
    other = seq(prompt=[1], slot=0, temperature=0.8, top_p=0.9, frequency_penalty=1.0)
    for t in range(8):
        logits = rand_logits(2, seed=40 + t, scale=1.0)
        logits[1, 10:14] += 3.0  # the seen tokens lead unless penalised
        expected = int(reference_penalised(logits[1], s).argmax())
        out = sampler(logits, [other, s]).token_ids
        assert out[1] == expected, t
        other.append_token(out[0])
        s.append_token(out[1])
        if t == 3:
            s.slot, other.slot = 0, 2  # swapped: both slots change hands


def test_penalised_rows_need_a_slot():
    with pytest.raises(AssertionError, match="slot"):
        Sampler()(rand_logits(1), [seq(repetition_penalty=1.2)])


# ---- min_tokens, logprobs, vocabulary padding ----------------------------------------------------------------------
def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(1, V)
    logits[:, 2], logits[:, 1], logits[:, 40] = 100.0, 90.0, 50.0  # stop ids dominate
    early = seq(output=[20], temperature=0, min_tokens=2)
    done = seq(output=[20, 21], temperature=0, min_tokens=2)
    ignoring = seq(output=[20], temperature=0, min_tokens=2, ignore_eos=True)  # defaults do not stop it anyway
    sampled = seq(output=[20], temperature=1.0, min_tokens=3)
    out = Sampler()(logits.expand(4, V).clone(), [early, done, ignoring, sampled]).token_ids
    assert out[:3] == [40, 2, 2] and out[3] not in STOP_IDS


def test_logprobs_are_raw_top_k_plus_the_sampled_token():
    logits = rand_logits(3, seed=5)
    seqs = [seq(temperature=0.5, top_k=2, logprobs=3, repetition_penalty=1.3, output=[1], slot=0),
            seq(logprobs=0), seq(temperature=0)]
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


def test_logprobs_of_many_rows_line_up_with_their_rows():
    logits = rand_logits(40, seed=6)
    seqs = [seq(temperature=0, logprobs=i % 3) if i % 4 else seq() for i in range(40)]
    out = Sampler()(logits, seqs)
    raw = torch.log_softmax(logits, -1)
    for i, s in enumerate(seqs):
        if s.params.logprobs is None:
            assert out.logprobs[i] is None
            continue
        expected = {out.token_ids[i]} | set(torch.topk(raw[i], s.params.logprobs).indices.tolist())
        assert set(out.logprobs[i]) == expected
        assert all(lp == pytest.approx(raw[i, t].item(), abs=1e-5) for t, lp in out.logprobs[i].items())


def test_vocab_padding_rows_are_never_sampled():
    logits = torch.zeros(2, V)
    logits[:, V - 1] = 50.0
    out = Sampler(vocab_size=V - 4)(logits, [seq(temperature=0), seq(top_p=0.5)]).token_ids
    assert all(t < V - 4 for t in out)


@pytest.mark.parametrize("vocab", [151343, 1024, 40, 33])  # the real vocabulary (a tail past the chunks), exact
def test_cpu_argmax_without_kernels_equals_torch(monkeypatch, vocab):
    """The chunked greedy argmax (CPUs without our kernel) gives torch's ids: first index on ties, NaN counted as
    the maximum, all -inf rows, a maximum in the tail past the last whole chunk."""
    from glm4.engine import sampler as sampler_module
    from glm4.kernels import cpu

    monkeypatch.setattr(cpu, "ready", lambda: False)
    g = torch.Generator().manual_seed(vocab)
    for x in (torch.randn(19, vocab, generator=g), torch.randint(0, 3, (19, vocab), generator=g).float()):
        x[3, -1] = float("nan")
        x[5, 7] = x[5, -2] = float("nan")
        x[9, :] = float("-inf")
        x[11, -1] = 1e9  # the tail's maximum wins
        assert torch.equal(sampler_module._argmax(x), x.argmax(dim=-1))
