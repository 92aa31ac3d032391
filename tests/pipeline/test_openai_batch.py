"""OpenAI Batch files: line parsing, byte-range read tasks, the request mapping shared with Serve (and the Parquet
path's sampling-params column), preprocess/postprocess bodies checked with the official `openai` types, and one
run on a local Ray cluster (read -> preprocess -> engine -> postprocess -> JSONL datasink with checkpointing)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import fsspec
import openai.types
import openai.types.chat
import pyarrow as pa
import pytest

import glm4
from pipeline.config import StorageOptions
from pipeline.openai_batch import (
    ERROR_BODY,
    ERROR_STATUS,
    KIND,
    LINE_ERROR,
    JsonlLinesDatasink,
    OpenAIBatchSpec,
    iter_owned_lines,
    make_jsonl_datasource,
    parse_line,
    postprocess_openai_batch,
    preprocess_openai_batch,
    split_ranges,
)
from pipeline.openai_requests import FieldError, sampling_kwargs_from_openai
from pipeline.stages import ERROR_IN, PARAMS, TOKEN_IDS, RowError, RowResult, _row_params, add_result_columns

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def req_line(custom_id, url, body, method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def chat_body(text="hi", **kw) -> dict:
    return {"model": "glm4-tiny", "messages": [{"role": "user", "content": text}], **kw}


def spec_for(model_dir, **kw) -> OpenAIBatchSpec:
    return OpenAIBatchSpec(model=str(model_dir), storage=StorageOptions(), model_cache_dir="/nonexistent",
                           id_column="rid", **kw)


def _parse_rows(lines: list[str | bytes]) -> pa.Table:
    """Rows as the reader makes them, without Ray."""
    parsed = [parse_line(line) for line in lines]
    return pa.table({
        "rid": [f"f@{i}" for i in range(len(parsed))],
        "custom_id": pa.array([p.custom_id for p in parsed], pa.string()),
        "url": pa.array([p.url for p in parsed], pa.string()),
        "body": pa.array([p.body for p in parsed], pa.string()),
        "__line_error": pa.array([p.error for p in parsed], pa.string()),
        "__line_error_code": pa.array([p.error_code for p in parsed], pa.string()),
    })


# --- line parsing ----------------------------------------------------------------------------------------------------
def test_parse_good_lines():
    chat = parse_line(req_line("c1", CHAT, chat_body(max_completion_tokens=5)).encode() + b"\r\n")
    assert (chat.custom_id, chat.url, chat.error) == ("c1", CHAT, None)
    assert json.loads(chat.body) == chat_body(max_completion_tokens=5)
    assert " " not in chat.body.replace("glm4-tiny", "")  # compact
    comp = parse_line(req_line("c2", COMPLETIONS, {"model": "m", "prompt": "héllo"}))
    assert (comp.custom_id, comp.url, comp.error) == ("c2", COMPLETIONS, None)
    assert comp.body == '{"model":"m","prompt":"héllo"}'
    assert parse_line(b"") is None and parse_line(b"  \r\n") is None


@pytest.mark.parametrize("line, code, needle, custom_id", [
    (b"{not json", "invalid_json_line", "line is not valid JSON", None),
    (b'{"custom_id": "a", "x": NaN}', "invalid_json_line", "NaN is not valid JSON", None),
    (b"\xff\xfe{}", "invalid_json_line", "not valid UTF-8", None),
    (b"[1, 2]", "invalid_json_line", "must be a JSON object, got array", None),
    (b'"text"', "invalid_json_line", "must be a JSON object, got string", None),
    (json.dumps({"method": "POST", "url": CHAT, "body": {}}), "invalid_custom_id", "got missing", None),
    (json.dumps({"custom_id": 7, "method": "POST", "url": CHAT, "body": {}}), "invalid_custom_id",
     "got a number", None),
    (json.dumps({"custom_id": "", "method": "POST", "url": CHAT, "body": {}}), "invalid_custom_id", "got empty",
     None),
    (req_line("m1", CHAT, chat_body(), method="GET"), "invalid_method", 'method must be "POST", got "GET"', "m1"),
    (json.dumps({"custom_id": "m2", "url": CHAT, "body": {}}), "invalid_method", "got null", "m2"),
    (req_line("u1", "/v1/embeddings", {}), "invalid_url", 'url "/v1/embeddings" is not supported', "u1"),
    (json.dumps({"custom_id": "u2", "method": "POST", "body": {}}), "invalid_url", "url null", "u2"),
    (json.dumps({"custom_id": "b1", "method": "POST", "url": CHAT}), "invalid_body", "got missing", "b1"),
    (json.dumps({"custom_id": "b2", "method": "POST", "url": CHAT, "body": "{}"}), "invalid_body",
     "got a string", "b2"),
])
def test_parse_bad_lines(line, code, needle, custom_id):
    p = parse_line(line)
    assert p.error_code == code and needle in p.error, p
    assert p.custom_id == custom_id and p.body is None


# --- byte ranges -----------------------------------------------------------------------------------------------------
def _fixture_file(tmp_path) -> tuple[Path, list[tuple[int, str]]]:
    """Lines of varied lengths (one long, one blank, CRLF, non-ASCII), the last without a newline."""
    lines = [req_line(f"id{i}", CHAT, chat_body("x" * (i * 7 % 40) + "é")) for i in range(12)]
    lines[5] = req_line("id5", CHAT, chat_body("long " * 60))
    raw = b""
    expected = []
    for i, line in enumerate(lines):
        if i == 3:
            raw += b"\n"  # blank line: skipped
        expected.append((len(raw), f"id{i}"))
        raw += line.encode() + (b"\r\n" if i == 7 else b"\n")
    raw = raw[:-1]  # no trailing newline
    path = tmp_path / "in" / "sub" / "reqs.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(raw)
    return path, expected


@pytest.mark.parametrize("bytes_per_task", [1, 2, 3, 17, 100, 333, 10**6])
def test_byte_ranges_read_every_line_exactly_once(tmp_path, bytes_per_task):
    path, expected = _fixture_file(tmp_path)
    size = path.stat().st_size
    ranges = split_ranges(size, bytes_per_task)
    assert ranges[0][0] == 0 and ranges[-1][1] == size and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    source = make_jsonl_datasource(fsspec.filesystem("file"), [(str(path), "sub/reqs.jsonl", size)],
                                   id_column="rid", bytes_per_task=bytes_per_task)
    tasks = source.get_read_tasks(1)
    assert len(tasks) == len(ranges)
    table = pa.concat_tables(block for task in tasks for block in task())
    assert table.column_names == ["rid", "custom_id", "url", "body", "__line_error", "__line_error_code"]
    assert table["rid"].to_pylist() == [f"sub/reqs.jsonl@{off}" for off, _ in expected]
    assert table["custom_id"].to_pylist() == [cid for _, cid in expected]
    assert table[LINE_ERROR].null_count == table.num_rows
    raw = path.read_bytes()
    for off, _ in expected:  # every id's offset is where its line starts
        assert raw[off:off + 14] == b'{"custom_id": '


def test_byte_ranges_on_s3(tmp_path, s3, bucket):
    path, expected = _fixture_file(tmp_path)
    key = f"{bucket}/in/reqs.jsonl"
    s3.pipe(key, path.read_bytes())
    source = make_jsonl_datasource(s3, [(key, "reqs.jsonl", s3.size(key))], id_column="rid", bytes_per_task=50)
    table = pa.concat_tables(block for task in source.get_read_tasks(1) for block in task())
    assert table["rid"].to_pylist() == [f"reqs.jsonl@{off}" for off, _ in expected]
    assert table["custom_id"].to_pylist() == [cid for _, cid in expected]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64])
def test_owned_lines_boundaries(chunk_size):
    data = b"aa\nbb\ncc"

    def owned(a, b, d=data):
        return list(iter_owned_lines(io.BytesIO(d), a, b, chunk_size=chunk_size))

    assert [owned(a, b) for a, b in [(0, 3), (3, 4), (4, 6), (6, 8)]] == [[(0, b"aa\n")], [(3, b"bb\n")], [],
                                                                          [(6, b"cc")]]
    assert owned(1, 8) == [(3, b"bb\n"), (6, b"cc")]
    assert owned(0, 2) == [(0, b"aa\n")] and owned(2, 3) == [] and owned(7, 8) == []
    assert owned(0, 5, b"\n\nx\n\n\n") == [(0, b"\n"), (1, b"\n"), (2, b"x\n"), (4, b"\n")]
    assert split_ranges(0, 10) == []
    # every cut of a file with long and short lines gives every line once
    lines = [b"x" * n + b"\n" for n in (0, 1, 9, 2, 30, 0, 4)] + [b"tail"]
    blob = b"".join(lines)
    starts = [sum(map(len, lines[:i])) for i in range(len(lines))]
    for per_task in (1, 2, 7, 16, len(blob)):
        got = [x for a, b in split_ranges(len(blob), per_task) for x in owned(a, b, blob)]
        assert got == list(zip(starts, lines)), per_task


# --- the shared mapping ----------------------------------------------------------------------------------------------
def test_openai_fields_to_sampling_params():
    kw = sampling_kwargs_from_openai({"max_completion_tokens": 7, "stop": "END", "seed": 3, "temperature": 0,
                                      "top_p": None, "user": "u1", "model": "x", "stream": False, "logit_bias": {},
                                      "top_k": 5})
    assert kw == {"max_tokens": 7, "stop": ["END"], "seed": 3, "temperature": 0, "top_k": 5}
    assert glm4.SamplingParams(**kw).validate().stop == ["END"]
    assert sampling_kwargs_from_openai({"logprobs": True, "top_logprobs": 3}) == {"logprobs": 3}
    assert sampling_kwargs_from_openai({"logprobs": True}) == {"logprobs": 0}
    assert sampling_kwargs_from_openai({"logprobs": False}) == {}
    assert sampling_kwargs_from_openai({"logprobs": 2}) == {"logprobs": 2}
    assert sampling_kwargs_from_openai({"max_tokens": 4, "max_completion_tokens": 4}) == {"max_tokens": 4}
    for fields, param in [({"max_tokens": 4, "max_completion_tokens": 5}, "max_tokens"),
                          ({"logit_bias": {"1": 2.0}}, "logit_bias"), ({"stream": True}, "stream"),
                          ({"top_logprobs": 2}, "top_logprobs")]:
        with pytest.raises(FieldError) as e:
            sampling_kwargs_from_openai(fields)
        assert e.value.param == param


def test_parquet_row_params_accept_openai_names():
    defaults = {"max_tokens": 16, "temperature": 0.0}
    assert _row_params(defaults, {"max_completion_tokens": 5, "stop": "x", "seed": 9, "user": "u"}) == {
        "max_tokens": 5, "temperature": 0.0, "stop": ["x"], "seed": 9}
    assert _row_params(defaults, '{"max_tokens": 3, "logit_bias": {}}')["max_tokens"] == 3
    for override, needle in [
        ({"max_tokens": 3, "max_completion_tokens": 4}, "invalid sampling params: max_tokens and "
                                                        "max_completion_tokens disagree"),
        ({"logit_bias": {"5": 1}}, "invalid sampling params: logit_bias is not supported"),
        ({"stream": True}, "invalid sampling params: stream is not supported"),
        ({"max_completion_tokens": 0}, "invalid sampling params: max_tokens must be"),
        ({"top_p": 2}, "invalid sampling params: top_p must be in (0, 1]"),
        ({"n": 2}, "invalid sampling params: n must be 1"),
        ({"bogus": 1}, "invalid sampling params: "),
    ]:
        with pytest.raises(RowError) as e:
            _row_params(defaults, override)
        assert str(e.value).startswith(needle), str(e.value)


def test_preprocess_matches_serve_preparation(model_dir):
    """Token ids and SamplingParams of a batch line are exactly what the Serve endpoint prepares for its body."""
    from pipeline.serve.preparation import RequestPreparer

    tok = glm4.load_tokenizer(model_dir)
    bodies = [(CHAT, chat_body("tell me", max_completion_tokens=5, stop="x", seed=11, temperature=0.5, top_k=3)),
              (CHAT, {**chat_body(), "messages": [{"role": "developer", "content": "be brief"},
                                                   {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
              (COMPLETIONS, {"model": "glm4-tiny", "prompt": "once upon", "max_tokens": 6, "stop": ["a", "b"]}),
              (COMPLETIONS, {"model": "glm4-tiny", "prompt": [1, 2, 3], "frequency_penalty": 0.5})]
    out = preprocess_openai_batch(_parse_rows([req_line(f"c{i}", u, b) for i, (u, b) in enumerate(bodies)]),
                                  spec_for(model_dir))
    assert out[ERROR_IN].to_pylist() == [None] * 4
    assert out[KIND].to_pylist() == ["chat", "chat", "completion", "completion"]
    preparer = RequestPreparer(tok, {"glm4-tiny"}, 2048, max_request_bytes=2**20, max_sequences_per_request=16,
                               max_tokens_limit=None)
    for i, (url, body) in enumerate(bodies):
        chat = url == CHAT
        req = preparer.parse(json.dumps(body).encode(), chat)
        prep = preparer.prepare_chat(req) if chat else preparer.prepare_completion(req)
        assert out[TOKEN_IDS][i].as_py() == prep.prompts[0]
        assert glm4.SamplingParams(**json.loads(out[PARAMS][i].as_py())) == prep.params
    p0 = json.loads(out[PARAMS][0].as_py())
    assert (p0["max_tokens"], p0["stop"], p0["seed"], p0["top_k"]) == (5, ["x"], 11, 3)
    assert out[TOKEN_IDS][2].as_py() == tok.encode_prompt("once upon")
    assert json.loads(out[PARAMS][1].as_py())["max_tokens"] == 2048 - len(out[TOKEN_IDS][1].as_py())  # rest of context


def test_invalid_requests_become_error_rows(model_dir):
    cases = [  # (body, url, status, param, code)
        (chat_body(n=2), CHAT, 400, "n", "invalid_value"),
        ({"model": "glm4-tiny", "prompt": ["a", "b"]}, COMPLETIONS, 400, "prompt", "invalid_value"),
        (chat_body(stream=True), CHAT, 400, "stream", "invalid_value"),
        (chat_body(logprobs=True), CHAT, 400, "logprobs", "invalid_value"),
        ({"model": "glm4-tiny", "prompt": "a", "logprobs": 0}, COMPLETIONS, 400, "logprobs", "invalid_value"),
        (chat_body(temperature="hot"), CHAT, 400, "temperature", "invalid_value"),
        (chat_body(max_tokens=3, max_completion_tokens=4), CHAT, 400, None, "invalid_request_body"),
        (chat_body(logit_bias={"1": 3}), CHAT, 400, "logit_bias", "invalid_value"),
        ({"messages": [{"role": "user", "content": "x"}]}, CHAT, 400, "model", "invalid_value"),
        (chat_body(model="gpt-4o"), CHAT, 404, "model", "model_not_found"),
        ({"model": "glm4-tiny", "prompt": "a" * 100}, COMPLETIONS, 400, "prompt", "context_length_exceeded"),
        ({"model": "glm4-tiny", "prompt": "a", "max_tokens": 500}, COMPLETIONS, 400, "max_tokens",
         "context_length_exceeded"),
    ]
    out = preprocess_openai_batch(_parse_rows([req_line(f"e{i}", u, b) for i, (b, u, *_) in enumerate(cases)]),
                                  spec_for(model_dir, max_model_len=64, served_model_names=frozenset({"glm4-tiny"})))
    for i, (_, _, status, param, code) in enumerate(cases):
        row = out.slice(i, 1).to_pylist()[0]
        body = json.loads(row[ERROR_BODY])
        assert row[ERROR_STATUS] == status and row[PARAMS] is None, (i, row)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["param"] == param and body["error"]["code"] == code, (i, body)
        assert row[ERROR_IN].startswith("invalid request: ") or i == 10
    assert out[ERROR_IN][10].as_py() == ("prompt too long: 102 tokens, the model's context is 64 tokens "
                                         "(no room for one generated token)")  # the Parquet path's wording
    assert "maximum context length is 64 tokens" in json.loads(out[ERROR_BODY][10].as_py())["error"]["message"]


# --- postprocess -----------------------------------------------------------------------------------------------------
def test_postprocess_bodies_parse_with_openai_types(model_dir):
    lines = [req_line("chat-1", CHAT, chat_body(max_completion_tokens=3)),
             req_line("comp-1", COMPLETIONS, {"model": "glm4-tiny", "prompt": "p", "max_tokens": 3}),
             req_line("bad-n", CHAT, chat_body(n=3)),
             "{oops",
             req_line("bad-url", "/v1/responses", {}),
             req_line("engine-refused", CHAT, chat_body())]
    spec = spec_for(model_dir)
    pre = preprocess_openai_batch(_parse_rows(lines), spec)
    results = [RowResult(text="héllo", finish_reason="length", num_prompt_tokens=7, num_generated_tokens=3,
                         num_cached_tokens=2),
               RowResult(text=" world", finish_reason="stop", num_prompt_tokens=3, num_generated_tokens=2),
               RowResult(finish_reason="error", error=pre[ERROR_IN][2].as_py()),
               RowResult(finish_reason="error", error=pre[ERROR_IN][3].as_py()),
               RowResult(finish_reason="error", error=pre[ERROR_IN][4].as_py()),
               RowResult(num_prompt_tokens=9, finish_reason="error", error="engine error: prompt has bad ids")]
    out = postprocess_openai_batch(add_result_columns(pre, results), spec)
    assert out.column_names == ["rid", "custom_id", "line", "status_code", "error_code"]
    assert out["status_code"].to_pylist() == [200, 200, 400, None, None, 400]
    assert out["error_code"].to_pylist() == [None, None, "invalid_value", "invalid_json_line", "invalid_url",
                                             "engine_error"]
    recs = [json.loads(s) for s in out["line"].to_pylist()]
    assert [r["custom_id"] for r in recs] == ["chat-1", "comp-1", "bad-n", None, "bad-url", "engine-refused"]
    for r in recs:
        assert set(r) == {"id", "custom_id", "response", "error"} and r["id"].startswith("batch_req_")
        assert (r["response"] is None) != (r["error"] is None)
        if r["response"] is not None:
            assert set(r["response"]) == {"status_code", "request_id", "body"}
            int(r["response"]["request_id"], 16)
    chat = openai.types.chat.ChatCompletion.model_validate(recs[0]["response"]["body"])
    assert chat.choices[0].message.content == "héllo" and chat.choices[0].finish_reason == "length"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (7, 3, 10)
    assert chat.model == "glm4-tiny" and chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
    comp = openai.types.Completion.model_validate(recs[1]["response"]["body"])
    assert comp.choices[0].text == " world" and comp.choices[0].finish_reason == "stop" and comp.usage.total_tokens == 5
    # Serve's body keys, exactly (no system_fingerprint key, which Serve does not send)
    assert list(recs[0]["response"]["body"]) == ["id", "object", "created", "model", "choices", "usage"]
    assert list(recs[0]["response"]["body"]["choices"][0]) == ["index", "message", "logprobs", "finish_reason"]
    from openai.types.shared import ErrorObject

    err = ErrorObject.model_validate(recs[2]["response"]["body"]["error"])
    assert err.param == "n"
    refused = ErrorObject.model_validate(recs[5]["response"]["body"]["error"])
    assert refused.message == "the engine refused the request: prompt has bad ids" and refused.code == "engine_error"
    assert recs[3]["error"]["code"] == "invalid_json_line" and recs[4]["error"]["code"] == "invalid_url"


def test_datasink_writes_only_the_line_column(tmp_path):
    from ray.data.block import BlockAccessor

    sink = JsonlLinesDatasink(str(tmp_path / "out"))
    buf = pa.BufferOutputStream()
    sink.write_block_to_file(BlockAccessor.for_block(pa.table({"rid": ["a", "b"], "line": ['{"x":1}', '{"é":2}']})),
                             buf)
    assert buf.getvalue().to_pybytes().decode() == '{"x":1}\n{"é":2}\n'
    with pytest.raises(ValueError, match="newline"):
        sink.write_block_to_file(BlockAccessor.for_block(pa.table({"line": ["a\nb"]})), pa.BufferOutputStream())
    with pytest.raises(ValueError, match="null"):
        sink.write_block_to_file(BlockAccessor.for_block(pa.table({"line": pa.array([None], pa.string())})),
                                 pa.BufferOutputStream())


# --- on a Ray cluster ------------------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_read_engine_write_with_checkpoint(ray_cluster, model_dir, tmp_path):
    import pyarrow.fs as pafs
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    from pipeline.stages import EngineReplica, EngineSpec

    good = {f"g{i}": (CHAT, chat_body(f"question {i}", max_completion_tokens=3, temperature=0)) if i % 2 else
            (COMPLETIONS, {"model": "glm4-tiny", "prompt": f"text {i}", "max_tokens": 3, "temperature": 0})
            for i in range(8)}
    lines = [req_line(cid, url, body) for cid, (url, body) in good.items()]
    lines.insert(3, req_line("bad-n", CHAT, chat_body(n=2)))
    lines.insert(6, "not json at all")
    lines.insert(8, req_line("bad-method", CHAT, chat_body(), method="PUT"))
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    half = len(lines) // 2
    (in_dir / "a.jsonl").write_text("\n".join(lines[:half]) + "\n")
    (in_dir / "b.jsonl").write_text("\n".join(lines[half:]))  # no trailing newline
    files = [(str(p), p.name, p.stat().st_size) for p in sorted(in_dir.glob("*.jsonl"))]
    spec = spec_for(model_dir, served_model_names=frozenset({"glm4-tiny"}))
    out_dir, ckpt_dir = tmp_path / "out", tmp_path / "ckpt"

    def run() -> None:
        ctx = ray.data.DataContext.get_current()
        saved = ctx.checkpoint_config, ctx.enable_progress_bars
        ctx.checkpoint_config = CheckpointConfig(id_column="rid", checkpoint_path=str(ckpt_dir),
                                                 delete_checkpoint_on_success=False,
                                                 override_filesystem=pafs.LocalFileSystem())
        ctx.enable_progress_bars = False
        try:
            ds = ray.data.read_datasource(make_jsonl_datasource(fsspec.filesystem("file"), files, id_column="rid",
                                                                bytes_per_task=400), num_cpus=0.25)
            ds = ds.map_batches(preprocess_openai_batch, fn_kwargs={"spec": spec}, batch_format="pyarrow",
                                batch_size=None, num_cpus=0.25)
            ds = ds.map_batches(EngineReplica, fn_constructor_kwargs={"spec": EngineSpec(
                model=str(model_dir), storage=StorageOptions(), model_cache_dir="/nonexistent",
                llm_kwargs={"device": "cpu"})}, batch_size=4, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)
            ds = ds.map_batches(postprocess_openai_batch, fn_kwargs={"spec": spec}, batch_format="pyarrow",
                                batch_size=None, num_cpus=0.25)
            ds.context.checkpoint_config = ctx.checkpoint_config
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds.write_datasink(JsonlLinesDatasink(str(out_dir), filesystem=pafs.LocalFileSystem(),
                                                     min_rows_per_file=4))
            assert not [w for w in caught if "doesn't support checkpointing" in str(w.message)]
        finally:
            ctx.checkpoint_config, ctx.enable_progress_bars = saved

    run()
    assert sum(len(split_ranges(size, 400)) for *_, size in files) >= 4  # several read tasks
    out_files = sorted(out_dir.glob("*.jsonl"))
    assert out_files and list(ckpt_dir.glob("*.parquet"))  # checkpoint files were committed
    assert not list(ckpt_dir.glob("*.pending*"))
    recs = [json.loads(line) for f in out_files for line in f.read_text().splitlines()]
    ids = [r["custom_id"] for r in recs]
    assert sorted(i for i in ids if i is not None) == sorted([*good, "bad-n", "bad-method"])
    assert ids.count(None) == 1  # the unparseable line
    by_id = {r["custom_id"]: r for r in recs}
    assert by_id["bad-n"]["response"]["status_code"] == 400
    assert by_id["bad-method"]["error"]["code"] == "invalid_method"
    llm = glm4.LLM(model_dir, device="cpu")
    tok = llm.tokenizer
    for cid, (url, body) in good.items():
        resp = by_id[cid]["response"]
        assert resp["status_code"] == 200 and by_id[cid]["error"] is None
        if url == CHAT:
            parsed = openai.types.chat.ChatCompletion.model_validate(resp["body"])
            text, ids_ = parsed.choices[0].message.content, tok.apply_chat_template(body["messages"])
        else:
            parsed = openai.types.Completion.model_validate(resp["body"])
            text, ids_ = parsed.choices[0].text, tok.encode_prompt(body["prompt"])
        ref = llm.generate([ids_], glm4.SamplingParams(temperature=0, max_tokens=3))[0]
        assert text == ref.text and parsed.usage.prompt_tokens == len(ids_)
        assert parsed.usage.completion_tokens == ref.num_generated_tokens

    # A rerun finds every row in the checkpoint: nothing is generated or written again.
    before = {f: f.read_bytes() for f in out_files}
    run()
    assert {f: f.read_bytes() for f in sorted(out_dir.glob("*.jsonl"))} == before
