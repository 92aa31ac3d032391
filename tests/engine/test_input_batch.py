"""The persistent batch: StepInputsBuilder sends only block-table changes, InputBatch applies them on the device,
and every step's block tables still equal the sequences' own (padded with 0), through admissions, prefix hits,
chunked prefill, finishes, aborts, preemptions and failed steps."""

from __future__ import annotations

import random

import torch

from glm4.engine.input_batch import InputBatch
from glm4.engine.llm_engine import LLMEngine
from glm4.engine.sampling_params import SamplingParams
from glm4.engine.step_inputs import StepInputs, StepInputsBuilder

from .test_scheduler import FakeModel, check_invariants, make_sched, make_seq


def expected(out, block_size):
    """What the step must see, computed the direct way from the sequences (O(context), fine in a test)."""
    width = max(-(-(e.start_pos + e.num_new_tokens) // block_size) for e in out.scheduled)
    tables = [e.seq.block_table[:width] + [0] * (width - len(e.seq.block_table[:width])) for e in out.scheduled]
    slots = [e.seq.block_table[p // block_size] * block_size + p % block_size
             for e in out.scheduled for p in range(e.start_pos, e.start_pos + e.num_new_tokens)]
    ids = [t for e in out.scheduled for t in e.seq.token_ids[e.start_pos:e.start_pos + e.num_new_tokens]]
    return tables, slots, ids


def check_table_rows(batch, seqs):
    """Each running sequence's row of the device table is its block table followed by zeros."""
    for seq in seqs:
        row = batch.block_table[seq.slot].tolist()
        assert row == seq.block_table + [0] * (len(row) - len(seq.block_table)), seq


def test_block_tables_match_through_preemption_prefix_hits_aborts_and_failed_steps():
    rng = random.Random(0)
    bs = 4
    sched = make_sched(num_blocks=20, block_size=bs, max_num_seqs=6, max_num_batched_tokens=24, max_model_len=96)
    builder = StepInputsBuilder(sched.max_num_seqs, bs)
    batch = InputBatch(sched.max_num_seqs, sched.max_model_len, bs, torch.device("cpu"))
    model = FakeModel(sched)
    shared = [rng.randrange(10, 500) for _ in range(12)]  # a common prefix: prefix-cache hits
    for i in range(40):
        prompt = (shared if i % 2 else []) + [rng.randrange(10, 500) for _ in range(rng.randrange(1, 20))]
        sched.add(make_seq(prompt, rid=f"r{i}", max_tokens=rng.randrange(1, 40)))
    decode_only_steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        check_invariants(sched, out)
        inputs = builder.build(out)
        fate = rng.random()
        if fate < 0.05:  # the step failed before reaching the device: its requests fail (as LLMEngine does)
            for rid in {e.seq.request_id for e in out.scheduled}:
                sched.abort(rid)
            continue
        _, meta = batch.prepare(inputs)
        if fate < 0.1:  # failed after the updates were applied (an OOM in the forward)
            for rid in {e.seq.request_id for e in out.scheduled}:
                sched.abort(rid)
            continue
        builder.commit()
        tables, slots, ids = expected(out, bs)
        assert meta.block_tables.tolist() == tables
        assert meta.slot_mapping.tolist() == slots and inputs.input_ids.tolist() == ids
        assert meta.query_lens == [e.num_new_tokens for e in out.scheduled]
        assert meta.context_lens_list == [e.start_pos + e.num_new_tokens for e in out.scheduled]
        check_table_rows(batch, sched.running)
        if all(e.num_new_tokens == 1 for e in out.scheduled) and not out.preempted:
            decode_only_steps += 1
        sched.postprocess(out, model.step(out))
        if rng.random() < 0.03 and sched.running:  # a stop string or a client abort between steps
            sched.abort(rng.choice(sched.running).request_id)
    assert sched.num_preemptions > 0 and sched.block_manager.num_hit_tokens > 0 and decode_only_steps > 0


def test_decode_steps_send_only_new_blocks():
    bs = 4
    sched = make_sched(num_blocks=200, block_size=bs, max_num_seqs=4, max_num_batched_tokens=256)
    builder = StepInputsBuilder(sched.max_num_seqs, bs)
    model = FakeModel(sched)
    for i in range(4):
        sched.add(make_seq(list(range(10 + i, 50 + i)), max_tokens=20))  # 40-token prompts: 10 blocks each
    out = sched.schedule()
    first = builder.build(out)
    builder.commit()
    assert first.table_updates.shape == (40, 3)  # each admitted table once, whole
    sched.postprocess(out, model.step(out))
    for step in range(8):
        out = sched.schedule()
        inputs = builder.build(out)
        builder.commit()
        # position 40 + step: a new block exactly when it starts one (40, 44: steps 0 and 4)
        assert inputs.table_updates.shape[0] == (4 if step % 4 == 0 else 0)
        sched.postprocess(out, model.step(out))


def test_pack_unpack_round_trip():
    inputs = StepInputs.from_lists([5, 6, 7], [0, 1, 2], [8, 9, 10], [2, 1], [2, 9], [3, 0], [3, 0, 2, 0, 2, 7],
                                   [1, 2], block_size=4)
    header, body = inputs.pack()
    assert body.numel() == StepInputs.body_numel(header)
    back = StepInputs.unpack(header, body.clone())
    assert back.block_table_width == 3 and back.table_updates.tolist() == [[3, 0, 2], [0, 2, 7]]
    for name in ("input_ids", "positions", "slot_mapping", "query_lens", "context_lens", "seq_slots",
                 "logits_indices"):
        assert getattr(back, name).tolist() == getattr(inputs, name).tolist(), name


def test_engine_persistent_table_equals_block_tables(tiny_checkpoint):
    """The real engine with a KV cache small enough to preempt, prompts that share prefixes (prefix hits) and
    n=2 requests: after every step the runner's table rows equal the scheduled sequences' block tables."""
    # tiny preset: 2 layers x 2 KV heads x head_dim 16, fp32 -> 512 bytes per token of K and V
    engine = LLMEngine.from_pretrained(tiny_checkpoint, dtype="float32", device="cpu", block_size=4,
                                       kv_cache_memory=48 * 4 * 512, max_num_seqs=6, max_num_batched_tokens=32)
    runner = engine.executor.runner
    scheduled = []
    schedule, execute = engine.scheduler.schedule, engine.executor.execute

    def record_schedule():
        out = schedule()
        scheduled[:] = [e.seq for e in out.scheduled]
        return out

    def checked_execute(inputs):
        logits = execute(inputs)
        check_table_rows(runner.input_batch, scheduled)
        return logits

    engine.scheduler.schedule, engine.executor.execute = record_schedule, checked_execute
    rng = random.Random(0)
    shared = [rng.randrange(0, 256) for _ in range(10)]
    for i in range(12):
        prompt = shared + [rng.randrange(0, 256) for _ in range(rng.randrange(1, 12))]
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                           n=2 if i % 3 == 0 else 1))
    finished = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
    assert len(finished) == 12 and all(o.error is None for o in finished.values())
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    engine.shutdown()
