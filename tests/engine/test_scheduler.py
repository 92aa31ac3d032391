"""Scheduler + BlockManager driven by a fake model that checks the paged-KV bookkeeping. No torch.

The fake model writes a value derived from tokens[:p+1] into the slot of every computed position p, and before
sampling reads every position of the sequence back through its block table. A wrong block table, a prefix hit
on the wrong block, a write into a shared block, or stale K/V after preemption fails the run.
"""

import random

import pytest

from glm4.engine.sampling_params import SamplingParams
from glm4.engine.scheduler import Scheduler
from glm4.engine.sequence import Sequence, SequenceStatus

STOP_IDS = (1, 2, 3)


def default_next_token(tokens):
    return 10 + hash(tuple(tokens)) % 500  # never a stop id


class FakeModel:
    def __init__(self, scheduler, next_token=default_next_token):
        self.sched = scheduler
        self.bs = scheduler.block_size
        self.next_token = next_token
        self.kv = {}

    def slot(self, seq, p):
        return seq.block_table[p // self.bs] * self.bs + p % self.bs

    def step(self, out):
        blocks = self.sched.block_manager.blocks
        for e in out.scheduled:
            assert e.start_pos == e.seq.num_computed_tokens
            for p in range(e.start_pos, e.start_pos + e.num_new_tokens):
                slot = self.slot(e.seq, p)
                assert blocks[slot // self.bs].ref_count == 1, f"write into a shared block: {e.seq}"
                self.kv[slot] = hash(tuple(e.seq.token_ids[:p + 1]))
        sampled = []
        for e in out.scheduled:
            if not e.sample:
                sampled.append(None)
                continue
            seq = e.seq
            assert e.start_pos + e.num_new_tokens == len(seq)
            for p in range(len(seq)):
                assert self.kv.get(self.slot(seq, p)) == hash(tuple(seq.token_ids[:p + 1])), (seq, p)
            sampled.append(self.next_token(seq.token_ids))
        return sampled


def make_sched(**kw):
    args = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256)
    args.update(kw)
    return Scheduler(**args)


def make_seq(prompt, rid=None, index=0, **params):
    params.setdefault("max_tokens", 8)
    return Sequence(rid if rid is not None else f"r{random.random()}", prompt, SamplingParams(**params),
                    index=index, eos_token_ids=STOP_IDS)


def check_invariants(sched, out):
    bm = sched.block_manager
    assert out.num_batched_tokens == sum(e.num_new_tokens for e in out.scheduled) <= sched.max_num_batched_tokens
    kinds = [e.is_prefill for e in out.scheduled]
    assert kinds == sorted(kinds), f"decodes must come before prefill chunks: {kinds}"
    assert len(sched.running) <= sched.max_num_seqs
    refs = [0] * bm.num_blocks
    for s in sched.running:
        assert s.status is SequenceStatus.RUNNING
        assert len(s.block_table) >= bm.blocks_for_tokens(s.num_computed_tokens)
        for b in s.block_table:
            refs[b] += 1
    assert [b.ref_count for b in bm.blocks] == refs, "leaked or double-counted blocks"
    assert all(s.status is SequenceStatus.WAITING and not s.block_table for s in sched.waiting)
    check_slots(sched)


def check_slots(sched):
    """Running sequences hold distinct slots in [0, max_num_seqs); nobody else holds one; none leaked."""
    slots = [s.slot for s in sched.running]
    assert len(set(slots)) == len(slots) and all(0 <= x < sched.max_num_seqs for x in slots), slots
    assert all(s.slot is None for s in sched.waiting)
    assert sorted(slots + sched._free_slots) == list(range(sched.max_num_seqs)), "leaked or double-freed slot"


def run(sched, model=None, max_steps=5000, on_step=None):
    model = model or FakeModel(sched)
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return steps
        out = sched.schedule()
        check_invariants(sched, out)
        assert not out.is_empty, "no progress while work is pending"
        steps.append([(e.seq, e.num_new_tokens, e.is_prefill, e.sample) for e in out.scheduled])
        finished = sched.postprocess(out, model.step(out))
        assert all(s.slot is None for s in finished + out.preempted)
        check_slots(sched)
        if on_step:
            on_step(out, finished)
    raise AssertionError("did not finish")


def test_budget_respected_and_everything_completes():
    rng = random.Random(0)
    sched = make_sched(max_num_batched_tokens=32, max_num_seqs=6)
    seqs = [make_seq([rng.randrange(10, 500) for _ in range(rng.randrange(1, 80))], max_tokens=rng.randrange(1, 20))
            for _ in range(25)]
    for s in seqs:
        sched.add(s)
    run(sched)
    for s in seqs:
        assert s.finish_reason == "length" and s.num_output_tokens == s.params.max_tokens
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_chunked_prefill_mixes_with_decode_in_one_step():
    sched = make_sched(max_num_batched_tokens=16)
    x, y = make_seq([11, 12, 13, 14], max_tokens=10), make_seq(list(range(100, 150)), max_tokens=2)
    sched.add(x)
    sched.add(y)
    steps = run(sched)
    # step 1: x's whole prompt + the first 12 tokens of y; then x decodes first and y takes the rest.
    assert steps[0] == [(x, 4, True, True), (y, 12, True, False)]
    assert steps[1] == [(x, 1, False, True), (y, 15, True, False)]
    assert steps[2] == [(x, 1, False, True), (y, 15, True, False)]
    assert steps[3] == [(x, 1, False, True), (y, 8, True, True)]
    assert steps[4] == [(x, 1, False, True), (y, 1, False, True)]


def test_decodes_are_scheduled_before_new_prefills():
    sched = make_sched(max_num_batched_tokens=8, max_num_seqs=8)
    early = [make_seq([20 + i, 21, 22], max_tokens=30) for i in range(2)]
    for s in early:
        sched.add(s)
    run_one = FakeModel(sched)
    out = sched.schedule()
    sched.postprocess(out, run_one.step(out))
    sched.add(make_seq(list(range(200, 240)), max_tokens=3))
    out = sched.schedule()
    assert [(e.seq, e.num_new_tokens) for e in out.scheduled[:2]] == [(early[0], 1), (early[1], 1)]
    assert out.scheduled[2].num_new_tokens == 6 and out.scheduled[2].is_prefill


def test_preemption_under_tight_cache_and_victims_complete():
    # 12 blocks * 4 = 48 token slots; each request needs up to 10 + 20 - 1 = 29 of them.
    sched = make_sched(num_blocks=12, max_num_batched_tokens=64, max_num_seqs=6)
    seqs = [make_seq([30 + i] * 10, max_tokens=20) for i in range(6)]
    for s in seqs:
        sched.add(s)
    preempted = []
    run(sched, on_step=lambda out, fin: preempted.extend(out.preempted))
    assert sched.num_preemptions > 0 and preempted
    for s in seqs:
        assert s.finish_reason == "length" and s.num_output_tokens == 20
        assert s.output_token_ids == reference_outputs(s.prompt_token_ids, 20)
    assert any(s.num_preemptions for s in seqs)
    assert sched.block_manager.num_free_blocks == 12


def reference_outputs(prompt, n):
    toks = list(prompt)
    for _ in range(n):
        toks.append(default_next_token(toks))
    return toks[len(prompt):]


def test_preempts_most_recent_and_requeues_at_front():
    sched = make_sched(num_blocks=4, max_num_batched_tokens=64, max_num_seqs=4)
    a, b = make_seq([40] * 4, max_tokens=9), make_seq([50] * 4, max_tokens=9)  # 3 blocks each, 4 in all
    sched.add(a)
    sched.add(b)
    model = FakeModel(sched)
    out = sched.schedule()  # both admitted: 1 block each
    sched.postprocess(out, model.step(out))
    out = sched.schedule()  # each needs a second block: 2 free -> fine
    sched.postprocess(out, model.step(out))
    for _ in range(4):  # the 4th step needs a third block for a, and none is free
        out = sched.schedule()
        check_invariants(sched, out)
        if out.preempted:
            break
        sched.postprocess(out, model.step(out))
    assert out.preempted == [b] and sched.waiting[0] is b and b.block_table == [] and b.num_computed_tokens == 0
    assert b.slot is None and a.slot == 0
    assert sched.running == [a]


def test_prefix_caching_preemption_and_chunking_keep_outputs():
    """Batch invariance in miniature: outputs do not depend on cache size, chunking or prefix hits."""
    rng = random.Random(1)
    shared = [rng.randrange(10, 500) for _ in range(20)]
    prompts = [shared + [rng.randrange(10, 500) for _ in range(rng.randrange(1, 12))] for _ in range(12)]
    for kw in (dict(num_blocks=200, max_num_batched_tokens=512), dict(num_blocks=20, max_num_batched_tokens=7),
               dict(num_blocks=24, max_num_batched_tokens=64, enable_prefix_caching=False, policy="fcfs")):
        sched = make_sched(max_num_seqs=5, **kw)
        seqs = [make_seq(p, max_tokens=15) for p in prompts]
        for s in seqs:
            sched.add(s)
        run(sched)
        for s in seqs:
            assert s.output_token_ids == reference_outputs(s.prompt_token_ids, 15), kw


def test_lpm_groups_shared_prefixes():
    p, q = [5] * 8, [6] * 8
    order = {}
    for policy in ("fcfs", "lpm"):
        sched = make_sched(max_num_seqs=1, policy=policy)
        seqs = {name: make_seq(pre + [tail], rid=name, max_tokens=2)
                for name, pre, tail in (("A1", p, 100), ("B1", q, 101), ("A2", p, 102), ("B2", q, 103),
                                        ("A3", p, 104))}
        for s in seqs.values():
            sched.add(s)
        done = []
        run(sched, on_step=lambda out, fin: done.extend(s.request_id for s in fin))
        order[policy] = done
    assert order["fcfs"] == ["A1", "B1", "A2", "B2", "A3"]
    assert order["lpm"] == ["A1", "A2", "A3", "B1", "B2"]


def test_lpm_falls_back_to_fcfs_for_long_queues():
    sched = make_sched(max_num_seqs=1, lpm_max_queue=2)
    names = []
    for name, pre in (("A1", [5] * 8), ("B1", [6] * 8), ("A2", [5] * 8), ("B2", [6] * 8)):
        sched.add(make_seq(pre + [100], rid=name, max_tokens=2))
    run(sched, on_step=lambda out, fin: names.extend(s.request_id for s in fin))
    assert names == ["A1", "B1", "A2", "B2"]  # lpm would have put A2 before B1


def test_n_samples_share_prompt_blocks():
    """Siblings wait one step for the first sample's prompt K/V, then hit it instead of recomputing it."""
    sched = make_sched(max_num_batched_tokens=64)
    prompt = list(range(100, 113))  # 13 tokens: 3 full blocks are shareable (never the last token)
    seqs = [make_seq(prompt, rid="req", index=i, max_tokens=4) for i in range(3)]
    for s in seqs:
        sched.add(s)
    model = FakeModel(sched)
    out = sched.schedule()
    assert out.seqs == [seqs[0]]
    sched.postprocess(out, model.step(out))
    out = sched.schedule()
    assert [(e.seq, e.num_new_tokens) for e in out.scheduled] == [(seqs[0], 1), (seqs[1], 1), (seqs[2], 1)]
    assert seqs[1].block_table[:3] == seqs[2].block_table[:3] == seqs[0].block_table[:3]
    assert seqs[1].num_cached_tokens == 12
    sched.postprocess(out, model.step(out))
    run(sched, model)
    assert sched.block_manager.num_hit_tokens == 24
    assert sched.stats()["prefix_cache_hit_rate"] == pytest.approx(24 / 39)


def test_abort_frees_blocks_running_and_waiting():
    sched = make_sched(max_num_seqs=1)
    a, a2, b = make_seq([7] * 9, rid="a", max_tokens=50), make_seq([7] * 9, rid="a", index=1), make_seq([8] * 5, rid="b")
    for s in (a, a2, b):
        sched.add(s)
    model = FakeModel(sched)
    out = sched.schedule()
    sched.postprocess(out, model.step(out))
    assert a.status is SequenceStatus.RUNNING and a.block_table
    aborted = sched.abort("a")
    assert set(aborted) == {a, a2}
    assert all(s.finish_reason == "abort" for s in aborted)
    assert sched.running == [] and list(sched.waiting) == [b]
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert sched.abort("a") == [] and sched.abort("unknown") == []
    run(sched, model)
    assert b.finish_reason == "length"


def test_slots_assigned_on_admission_reused_and_released_on_every_exit():
    sched = make_sched(max_num_seqs=3, max_num_batched_tokens=256)
    a = make_seq([7] * 5, rid="a", max_tokens=1)  # finishes in its first step (postprocess)
    b = make_seq([8] * 5, rid="b", max_tokens=50)  # aborted
    c = make_seq([9] * 5, rid="c", max_tokens=50)  # finished by a stop string (finish_seq)
    d = make_seq([6] * 5, rid="d", max_tokens=50)
    for s in (a, b, c, d):
        sched.add(s)
    assert all(s.slot is None for s in (a, b, c, d))
    model = FakeModel(sched)
    out = sched.schedule()
    assert [(e.seq, e.seq.slot) for e in out.scheduled] == [(a, 0), (b, 1), (c, 2)] and d.slot is None
    sched.postprocess(out, model.step(out))
    assert a.is_finished and a.slot is None
    out = sched.schedule()
    assert d.slot == 0, "a's slot is reused"
    sched.postprocess(out, model.step(out))
    sched.abort("b")
    sched.finish_seq(c, "stop", stop_reason="x")
    assert b.slot is None and c.slot is None
    check_slots(sched)
    e, f = make_seq([5] * 5, max_tokens=3), make_seq([4] * 5, max_tokens=3)
    sched.add(e)
    sched.add(f)
    sched.schedule()
    assert {e.slot, f.slot} == {1, 2}
    check_slots(sched)


def test_impossible_requests_error_without_crashing():
    sched = make_sched(num_blocks=4, max_model_len=64)  # 16 token slots
    too_long_output = make_seq([9] * 10, max_tokens=20)  # needs 29 slots
    too_long_prompt = make_seq([9] * 64, max_tokens=1)
    empty = make_seq([], max_tokens=1)
    ok = make_seq([9] * 10, max_tokens=7)  # needs exactly 16 slots
    for s in (too_long_output, too_long_prompt, empty, ok):
        sched.add(s)
    for s in (too_long_output, too_long_prompt, empty):
        assert s.is_finished and s.finish_reason == "error" and s.error
    assert "max_tokens" in too_long_output.error and "max_model_len" in too_long_prompt.error
    run(sched)
    assert ok.finish_reason == "length" and ok.num_output_tokens == 7


def test_max_num_seqs_limits_running():
    sched = make_sched(max_num_seqs=2, max_num_batched_tokens=256)
    for i in range(5):
        sched.add(make_seq([60 + i] * 3, max_tokens=3))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and len(sched.waiting) == 3


def scripted(tokens_after_prompt):
    def next_token(toks):
        return tokens_after_prompt[len(toks) - 4]  # prompts in these tests have 4 tokens
    return next_token


@pytest.mark.parametrize("stop_id", STOP_IDS)
def test_each_default_stop_id_finishes_with_stop(stop_id):
    sched = make_sched()
    s = make_seq([50, 51, 52, 53], max_tokens=10)
    sched.add(s)
    run(sched, FakeModel(sched, scripted([20, 21, stop_id, 22, 23])))
    assert (s.finish_reason, s.stop_reason, s.output_token_ids) == ("stop", stop_id, [20, 21, stop_id])
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_min_tokens_ignore_eos_and_explicit_stop_ids():
    script = scripted([1, 2, 20, 3, 42, 21, 22, 23, 24, 25])
    cases = [(dict(min_tokens=3), "stop", 4), (dict(ignore_eos=True), "length", 10),
             (dict(stop_token_ids=[42]), "stop", 5), (dict(stop_token_ids=[42], ignore_eos=True), "stop", 5),
             (dict(max_tokens=2, min_tokens=2), "stop", 2)]
    for params, reason, n_out in cases:
        sched = make_sched()
        s = make_seq([50, 51, 52, 53], **{"max_tokens": 10, **params})
        sched.add(s)
        run(sched, FakeModel(sched, script))
        assert (s.finish_reason, s.num_output_tokens) == (reason, n_out), params


def test_max_model_len_finishes_with_length():
    sched = make_sched(max_model_len=10)
    s = make_seq([50, 51, 52, 53], max_tokens=100)
    sched.add(s)
    run(sched)
    assert s.finish_reason == "length" and len(s) == 10


def test_finish_seq_for_stop_strings_frees_blocks():
    sched = make_sched()
    s = make_seq([50, 51, 52, 53, 54], max_tokens=100)
    sched.add(s)
    model = FakeModel(sched)
    out = sched.schedule()
    sched.postprocess(out, model.step(out))
    sched.finish_seq(s, "stop", stop_reason="\n\n")
    assert (s.finish_reason, s.stop_reason) == ("stop", "\n\n")
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_stats_keys():
    stats = make_sched().stats()
    for key in ("num_running", "num_waiting", "kv_blocks_total", "kv_blocks_free", "prefix_cache_hit_rate",
                "num_preemptions"):
        assert key in stats
