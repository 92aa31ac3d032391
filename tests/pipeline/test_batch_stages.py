"""The Ray Data UDFs called directly on Arrow batches (no Ray cluster): validation messages, prefix order, the
engine replica against glm4.LLM, postprocess columns."""

from __future__ import annotations

import asyncio
import json

import pyarrow as pa
import pytest

import glm4
from pipeline.config import SamplingDefaults, StorageOptions
from pipeline.stages import (
    ERROR_IN,
    OUTPUT_COLUMNS,
    PARAMS,
    TOKEN_IDS,
    EngineReplica,
    EngineSpec,
    PostprocessSpec,
    PreprocessSpec,
    postprocess_batch,
    prefix_order,
    preprocess_batch,
)


def _pre(model_dir, **kw) -> PreprocessSpec:
    base = dict(model=str(model_dir), storage=StorageOptions(), model_cache_dir="/nonexistent",
                prompt_column="prompt", messages_column=None, sampling_params_column=None,
                default_params=SamplingDefaults(max_tokens=4).as_params(), max_model_len=None)
    base.update(kw)
    return PreprocessSpec(**base)


def test_bad_prompts_become_error_rows_with_specific_messages(model_dir):
    batch = pa.table({
        "prompt": ["hello", "", "   ", None, "x" * 200, "fine"],
        "params": [None, None, None, None, None, '{"temperature": 0.5, "max_tokens": 2}'],
    })
    out = preprocess_batch(batch, _pre(model_dir, max_model_len=64, sampling_params_column="params"))
    errors = out[ERROR_IN].to_pylist()
    assert errors[0] is None and errors[5] is None
    assert errors[1] == errors[2] == "empty prompt"
    assert errors[3] == "null prompt"
    assert errors[4].startswith("prompt too long: 202 tokens, the model's context is 64 tokens")
    tok = glm4.load_tokenizer(model_dir)
    assert out[TOKEN_IDS].to_pylist()[0] == tok.encode_prompt("hello")
    assert json.loads(out[PARAMS][5].as_py())["temperature"] == 0.5
    assert json.loads(out[PARAMS][0].as_py())["max_tokens"] == 4


@pytest.mark.parametrize(
    "override, needle",
    [
        ('{"temperature": -1}', "invalid sampling params: temperature must be"),
        ('{"top_p": 2}', "invalid sampling params: top_p must be in (0, 1]"),
        ('{"max_tokens": 0}', "invalid sampling params: max_tokens must be"),
        ('{"bogus": 1}', "invalid sampling params: "),
        ('{"n": 3}', "invalid sampling params: n must be 1"),
        ("{not json", "invalid sampling params: not valid JSON"),
        ("[1, 2]", "invalid sampling params: expected an object"),
    ],
)
def test_invalid_row_sampling_params(model_dir, override, needle):
    out = preprocess_batch(pa.table({"prompt": ["hi"], "p": [override]}),
                           _pre(model_dir, sampling_params_column="p"))
    assert out[ERROR_IN][0].as_py().startswith(needle), out[ERROR_IN][0].as_py()
    assert out[PARAMS][0].as_py() is None


def test_struct_sampling_params_column(model_dir):
    col = pa.array([{"temperature": 0.7, "seed": None}, None], pa.struct([("temperature", pa.float64()),
                                                                        ("seed", pa.int64())]))
    out = preprocess_batch(pa.table({"prompt": ["a", "b"], "p": col}), _pre(model_dir, sampling_params_column="p"))
    assert out[ERROR_IN].to_pylist() == [None, None]
    assert json.loads(out[PARAMS][0].as_py())["temperature"] == 0.7
    assert "seed" not in json.loads(out[PARAMS][0].as_py())  # nulls mean "use the default"


def test_chat_messages_validation(model_dir):
    msg = pa.struct([("role", pa.string()), ("content", pa.string())])
    good = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    batch = pa.table({"messages": pa.array(
        [good, [], None, [{"role": "tool", "content": "x"}], [{"role": "user", "content": None}],
         [{"role": "user", "content": ""}]], pa.list_(msg))})
    out = preprocess_batch(batch, _pre(model_dir, prompt_column=None, messages_column="messages"))
    errors = out[ERROR_IN].to_pylist()
    tok = glm4.load_tokenizer(model_dir)
    assert errors[0] is None and out[TOKEN_IDS][0].as_py() == tok.apply_chat_template(good)
    assert errors[1] == "malformed messages: empty conversation"
    assert errors[2] == "null messages"
    assert errors[3].startswith("malformed messages: messages[0].role: unknown role 'tool'")
    assert errors[4].startswith("malformed messages: messages[0]: missing field 'content'")
    assert errors[5] == "malformed messages: no message has content"
    # JSON strings are accepted too, and broken JSON is a row error.
    js = pa.table({"messages": [json.dumps(good), "[{", '{"role": "user"}']})
    errors = preprocess_batch(js, _pre(model_dir, prompt_column=None, messages_column="messages"))[ERROR_IN]
    assert errors[0].as_py() is None
    assert errors[1].as_py().startswith("malformed messages: not valid JSON")
    assert errors[2].as_py().startswith("malformed messages: messages must be a list")


def test_prefix_order_groups_rows_by_shared_prefix_within_a_window():
    system = list(range(300, 330))
    rows = [system + [1, 2], [5, 6, 7], None, system + [9], [5, 6, 8], system + [1, 3]]
    batch = pa.table({"i": list(range(len(rows))), TOKEN_IDS: pa.array(rows, pa.list_(pa.int32()))})
    order = prefix_order(batch, prefix_tokens=40)["i"].to_pylist()
    # rows sharing the 30-token system prompt are contiguous and keep their input order; so are the [5, 6, ...]
    # rows; the untokenized (error) row goes last
    assert order == [1, 4, 0, 5, 3, 2]
    assert prefix_order(batch, prefix_tokens=1)["i"].to_pylist() == [1, 4, 0, 3, 5, 2]  # stable on ties
    assert prefix_order(batch.slice(0, 1), 8).num_rows == 1


@pytest.fixture(scope="module")
def replica(model_dir):
    return EngineReplica(EngineSpec(model=str(model_dir), storage=StorageOptions(), model_cache_dir="/nonexistent",
                                    llm_kwargs={"device": "cpu"}))


def test_engine_replica_matches_llm_generate(model_dir, replica):
    prompts = ["alpha", "beta gamma", "", "delta " * 5, "alpha"]
    pre = preprocess_batch(pa.table({"id": list(range(5)), "prompt": prompts}),
                           _pre(model_dir, default_params=SamplingDefaults(max_tokens=6).as_params()))

    async def run_two_batches():  # two batches in flight on one replica, as Ray Data runs them
        return await asyncio.gather(replica(pre.slice(0, 3)), replica(pre.slice(3, 2)))

    a, b = asyncio.run(run_two_batches())
    out = pa.concat_tables([a, b])
    llm = glm4.LLM(model_dir, device="cpu")
    tok = llm.tokenizer
    ok = [0, 1, 3, 4]
    expected = llm.generate([tok.encode_prompt(prompts[i]) for i in ok],
                            glm4.SamplingParams(temperature=0, max_tokens=6))
    got = out.to_pylist()
    for i, e in zip(ok, expected):
        assert got[i]["generated_text"] == e.text and got[i]["error"] is None
        assert got[i]["num_generated_tokens"] == 6 and got[i]["finish_reason"] == "length"
        assert got[i]["num_prompt_tokens"] == len(tok.encode_prompt(prompts[i]))
    assert got[2]["error"] == "empty prompt" and got[2]["finish_reason"] == "error"
    assert got[2]["generated_text"] is None and got[2]["num_generated_tokens"] == 0


def test_postprocess_keeps_id_carry_and_output_columns(model_dir, replica):
    pre = preprocess_batch(pa.table({"pid": ["a", "b"], "prompt": ["x", None], "extra": [1, 2]}), _pre(model_dir))
    out = asyncio.run(replica(pre))
    final = postprocess_batch(out, PostprocessSpec(id_column="pid", carry_columns=("prompt",)))
    assert final.column_names == ["pid", "prompt", *OUTPUT_COLUMNS]
    assert final["error"].to_pylist() == [None, "null prompt"]
    assert not [c for c in final.column_names if c.startswith("__")]


def test_progress_line():
    from pipeline.progress import format_progress

    line = format_progress({"total": 100, "done_before": 20, "rows": 30, "errors": 2, "gen_tokens": 300,
                            "elapsed_s": 10.0,
                            "replicas": {"a": {"prefix_cache_hit_tokens": 30, "prefix_cache_query_tokens": 120}}})
    for part in ("50/100 rows (50.0%)", "3.00 rows/s", "30.0 gen tok/s", "errors 2", "ETA 00:00:16",
                 "prefix-cache hit 25.0%"):
        assert part in line, line


def test_progress_line_names_the_phase_before_the_first_row():
    from pipeline.progress import format_progress

    snap = {"total": 200, "done_before": 0, "rows": 0, "errors": 0, "gen_tokens": 0, "elapsed_s": 95.0,
            "replicas": {}, "driver_phase": ["replicas starting", 40.0],
            "replica_phases": {"n1:1": ["engine start (weights, KV cache, kernels)", 31.0],
                               "n1:2": ["model download", 12.0]}}
    line = format_progress(snap)
    assert "0/200 rows" in line and "ETA ?" in line
    assert "phase: engine start (weights, KV cache, kernels) on 1 replica(s) (31s), model download on 1" in line
    assert "phase: replicas starting (40s)" in format_progress({**snap, "replica_phases": {}})
    assert "phase" not in format_progress({**snap, "rows": 5})


def test_tracker_occupancy_is_running_over_slots_of_live_replicas():
    from pipeline.progress import ProgressTracker

    t = ProgressTracker(total=10, done_before=0)
    t.replica_stats("a", {"num_running": 32, "num_waiting": 100, "max_num_seqs": 64, "num_steps": 10,
                          "num_decode_tokens": 320})
    t.replica_stats("b", {"num_running": 64, "num_waiting": 0, "max_num_seqs": 64, "num_steps": 30,
                          "num_decode_tokens": 1280})
    snap = t.snapshot()
    assert snap["occupancy"] == 96 / 128
    assert [v for _, v in snap["occupancy_series"]] == [0.5, 0.75]
    assert snap["occupancy_mean"] == (320 + 1280) / (40 * 64)  # every step counted, not the samples
