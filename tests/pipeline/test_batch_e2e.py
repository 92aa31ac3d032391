"""The batch job end to end on a local Ray cluster: local->local, s3->s3 (moto), bad rows and exit status, chat
input, reruns. Every test checks that each input id appears exactly once and that generated_text equals what
glm4.LLM.generate gives for that row directly (greedy)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import glm4
from jobs.batch import main as cli_main
from pipeline.batch import run_batch
from pipeline.config import BatchJobConfig

from .conftest import write_prompts

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

MAX_TOKENS = 4
SMALL = dict(num_replicas=2, replica_num_cpus=0.5, batch_size=4, read_rows_per_task=6, rows_per_file=6,
             progress_interval_s=2.0, sampling={"max_tokens": MAX_TOKENS}, device="cpu")


def make_config(tmp_path, **kw) -> BatchJobConfig:
    return BatchJobConfig(**{**SMALL, "model_cache_dir": str(tmp_path / "cache"), **kw})


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy outputs of a bare glm4.LLM, one call per row (no batching effects on the reference side)."""
    llm = glm4.LLM(model_dir, device="cpu")
    cache: dict[tuple, str] = {}

    def text_for(ids: list[int], max_tokens: int = MAX_TOKENS) -> str:
        key = (tuple(ids), max_tokens)
        if key not in cache:
            cache[key] = llm.generate([ids], glm4.SamplingParams(temperature=0, max_tokens=max_tokens))[0].text
        return cache[key]

    return text_for, llm.tokenizer


def read_output(data_dir: str, fs=None) -> list[dict]:
    if fs is None:
        files = sorted(Path(data_dir).glob("*.parquet"))
        return [r for f in files for r in pq.read_table(f).to_pylist()]
    rows = []
    for p in sorted(fs.find(data_dir)):
        if p.endswith(".parquet"):
            with fs.open(p, "rb") as f:
                rows += pq.read_table(f).to_pylist()
    return rows


def assert_exactly_once(rows: list[dict], id_col: str, expected_ids) -> dict:
    ids = [r[id_col] for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    assert not dup, f"duplicated ids: {dup}"
    missing, extra = set(expected_ids) - set(ids), set(ids) - set(expected_ids)
    assert not missing and not extra, f"missing {sorted(missing)}, extra {sorted(extra)}"
    return {r[id_col]: r for r in rows}


def prompts_for(n: int) -> list[str]:
    # Half the rows share a long instruction prefix (prefix-aware ordering groups them).
    shared = "You are a terse assistant. Answer in one word. Question: "
    return [(shared if i % 2 else "") + f"item {i} of the batch" for i in range(n)]


def test_local_to_local(ray_cluster, model_dir, reference, tmp_path):
    text_for, tok = reference
    prompts = prompts_for(24)
    write_prompts(tmp_path / "in" / "part-0.parquet", {"pid": [f"r{i}" for i in range(12)], "prompt": prompts[:12],
                                                      "meta": list(range(12))}, row_group_size=4)
    write_prompts(tmp_path / "in" / "part-1.parquet", {"pid": [f"r{i}" for i in range(12, 24)],
                                                      "prompt": prompts[12:], "meta": list(range(12, 24))})
    cfg = make_config(tmp_path, input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(model_dir),
                      prompt_column="prompt", id_column="pid")
    lines: list[str] = []
    summary = run_batch(cfg, progress=lines.append)
    assert summary["status"] == "succeeded" and summary["exit_code"] == 0, summary
    rows = assert_exactly_once(read_output(str(tmp_path / "out" / "data")), "pid", [f"r{i}" for i in range(24)])
    for i, p in enumerate(prompts):
        r = rows[f"r{i}"]
        assert r["generated_text"] == text_for(tok.encode_prompt(p)), f"row r{i}"
        assert (r["prompt"], r["meta"], r["error"], r["finish_reason"]) == (p, i, None, "length")
        assert r["num_generated_tokens"] == MAX_TOKENS and r["num_prompt_tokens"] == len(tok.encode_prompt(p))
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists() and not (out / "_checkpoint").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows_in"] == manifest["counts"]["rows_ok"] == 24
    assert manifest["tokens"]["generated"] == 24 * MAX_TOKENS
    assert manifest["model"]["weights"]["sha256"] and manifest["model"]["config"]["num_layers"] >= 1
    assert manifest["versions"]["ray"] == "2.60.0" and manifest["config"]["id_column"] == "pid"
    assert 0.0 <= manifest["prefix_cache"]["hit_rate"] <= 1.0
    assert lines[0].startswith("[glm4-batch] 24 rows in 2 file(s)")
    assert lines[-1].startswith("[glm4-batch] succeeded: 24 ok, 0 error of 24 rows")
    # A finished job is a no-op on rerun.
    again = run_batch(cfg, progress=None)
    assert again["status"] == "skipped" and again["rows_ok"] == 24


def test_s3_to_s3_with_model_on_s3_and_derived_ids(ray_cluster, model_dir, reference, tmp_path, s3, s3_endpoint,
                                                   bucket):
    text_for, tok = reference
    prompts = prompts_for(14)
    write_prompts(f"{bucket}/in/a.parquet", {"prompt": prompts[:9]}, row_group_size=3, fs=s3)
    write_prompts(f"{bucket}/in/nested/b.parquet", {"prompt": prompts[9:]}, fs=s3)
    for p in model_dir.iterdir():
        s3.put_file(str(p), f"{bucket}/model/{p.name}")
    cfg = make_config(tmp_path, input=f"s3://{bucket}/in/", output=f"s3://{bucket}/out", model=f"s3://{bucket}/model",
                      prompt_column="prompt", storage={"endpoint_url": s3_endpoint})
    summary = run_batch(cfg, progress=None)
    assert summary["status"] == "succeeded", summary
    expected_ids = [f"a.parquet#{i}" for i in range(9)] + [f"nested/b.parquet#{i}" for i in range(5)]
    rows = assert_exactly_once(read_output(f"{bucket}/out/data", s3), "id", expected_ids)
    for rid, p in zip(expected_ids, prompts):
        assert rows[rid]["generated_text"] == text_for(tok.encode_prompt(p)) and rows[rid]["prompt"] == p
    assert s3.exists(f"{bucket}/out/_SUCCESS") and not s3.exists(f"{bucket}/out/_checkpoint")
    manifest = json.loads(s3.cat_file(f"{bucket}/out/manifest.json"))
    assert manifest["input"]["uri"] == f"s3://{bucket}/in/" and "testing" not in json.dumps(manifest)


def _bad_rows_file(path: Path) -> tuple[list, int]:
    prompts = ["fine one", "", None, "y" * 80, "fine two", "fine three", "   ", "fine four", "fine five", "ok six"]
    params = [None, None, None, None, '{"top_p": 7}', '{"temperature": 0.0}', None, '{"max_tokens": 2}',
              '{"max_tokens": "lots"}', None]
    write_prompts(path, {"pid": list(range(10)), "prompt": prompts, "params": params})
    return prompts, 6  # 6 bad rows: empty x2, null, too long, top_p, max_tokens type


def test_bad_rows_become_error_rows_and_exit_status_follows_max_error_fraction(ray_cluster, model_dir, reference,
                                                                               tmp_path):
    text_for, tok = reference
    prompts, n_bad = _bad_rows_file(tmp_path / "in.parquet")
    argv = ["--model", str(model_dir), "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
            "--prompt-column", "prompt", "--id-column", "pid", "--sampling-params-column", "params",
            "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--max-model-len", "64", "--num-replicas", "1",
            "--replica-num-cpus", "0.5", "--batch-size", "4", "--model-cache-dir", str(tmp_path / "cache"),
            "--device", "cpu", "--progress-interval", "5"]
    assert cli_main(argv + ["--max-error-fraction", "0.5"]) == 3  # 6/10 > 0.5
    out = tmp_path / "out"
    assert not (out / "_SUCCESS").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["counts"]["rows_error"] == n_bad
    assert "error fraction 0.6000 > max_error_fraction 0.5" in manifest["problems"][0]
    rows = assert_exactly_once(read_output(str(out / "data")), "pid", range(10))
    err = {i: rows[i]["error"] for i in range(10)}
    assert err[1] == err[6] == "empty prompt" and err[2] == "null prompt"
    assert err[3].startswith("prompt too long: 82 tokens, the model's context is 64 tokens")
    assert err[4].startswith("invalid sampling params: top_p must be in (0, 1]")
    assert err[8].startswith("invalid sampling params: max_tokens must be an integer")
    for i in (0, 5, 9):
        assert err[i] is None and rows[i]["generated_text"] == text_for(tok.encode_prompt(prompts[i]))
    assert rows[7]["generated_text"] == text_for(tok.encode_prompt(prompts[7]), 2)  # per-row max_tokens
    assert rows[7]["num_generated_tokens"] == 2
    # The same job with a tolerance above the error fraction succeeds without redoing any row.
    assert cli_main(argv + ["--max-error-fraction", "0.6"]) == 0
    assert (out / "_SUCCESS").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows_resumed"] == 10 and manifest["counts"]["rows_this_run"] == 0
    assert_exactly_once(read_output(str(out / "data")), "pid", range(10))


def test_chat_messages_column(ray_cluster, model_dir, reference, tmp_path):
    text_for, tok = reference
    system = {"role": "system", "content": "You are a helpful assistant that answers briefly."}
    convs = [[system, {"role": "user", "content": f"question {i}"}] for i in range(5)]
    convs.append([{"role": "robot", "content": "beep"}])
    write_prompts(tmp_path / "chat.parquet", {"messages": [json.dumps(c) for c in convs]})
    cfg = make_config(tmp_path, input=str(tmp_path / "chat.parquet"), output=f"file://{tmp_path}/out",
                      model=str(model_dir), messages_column="messages", max_error_fraction=0.2, carry_columns=[])
    summary = run_batch(cfg, progress=None)
    assert summary["status"] == "succeeded" and summary["rows_error"] == 1
    rows = assert_exactly_once(read_output(str(tmp_path / "out" / "data")), "id",
                               [f"chat.parquet#{i}" for i in range(6)])
    for i in range(5):
        assert rows[f"chat.parquet#{i}"]["generated_text"] == text_for(tok.apply_chat_template(convs[i]))
    assert rows["chat.parquet#5"]["error"].startswith("malformed messages: messages[0].role: unknown role 'robot'")
    assert set(rows["chat.parquet#0"]) == {"id", "generated_text", "finish_reason", "num_prompt_tokens",
                                           "num_generated_tokens", "num_cached_tokens", "error"}


def test_config_and_input_errors_exit_2(tmp_path, model_dir, capsys):
    write_prompts(tmp_path / "in.parquet", {"prompt": ["a"], "id": ["x"]})
    base = ["--model", str(model_dir), "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "o")]
    assert cli_main(base) == 2  # neither prompt nor messages column
    assert "exactly one of prompt_column and messages_column" in capsys.readouterr().err
    assert cli_main(base + ["--prompt-column", "text"]) == 2
    assert "prompt_column 'text' is not in the input" in capsys.readouterr().err
    assert cli_main(base + ["--prompt-column", "prompt"]) == 2  # an 'id' column but no --id-column
    assert "already has a column 'id'" in capsys.readouterr().err


def test_duplicate_ids_are_refused(ray_cluster, tmp_path, model_dir):
    write_prompts(tmp_path / "in.parquet", {"k": [1, 2, 2], "prompt": ["a", "b", "c"]})
    cfg = make_config(tmp_path, input=str(tmp_path / "in.parquet"), output=str(tmp_path / "o"), model=str(model_dir),
                      prompt_column="prompt", id_column="k")
    from pipeline.io import InputError

    with pytest.raises(InputError, match="1 duplicate value"):
        run_batch(cfg, progress=None)




@pytest.mark.gpu
def test_replicas_take_a_gpu_each_when_the_cluster_has_gpus(ray_cluster, model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    import ray

    if not torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("needs a CUDA device visible to Ray")
    prompts = prompts_for(8)
    write_prompts(tmp_path / "in.parquet", {"prompt": prompts})
    cfg = make_config(tmp_path, input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"),
                      model=str(model_dir), prompt_column="prompt", num_replicas=1, device="cuda")
    assert run_batch(cfg, progress=None)["status"] == "succeeded"
    llm = glm4.LLM(model_dir, device="cuda")
    rows = assert_exactly_once(read_output(str(tmp_path / "out" / "data")), "id",
                               [f"in.parquet#{i}" for i in range(8)])
    for i, p in enumerate(prompts):
        want = llm.generate([llm.tokenizer.encode_prompt(p)], glm4.SamplingParams(temperature=0,
                                                                                 max_tokens=MAX_TOKENS))[0].text
        assert rows[f"in.parquet#{i}"]["generated_text"] == want


def test_tensor_parallel_replica_through_ray_actors(ray_cluster, model_dir, reference, tmp_path):
    """tp=2 replicas run rank 0 in the Ray Data actor and rank 1 in a Ray actor (pipeline.tp_ray.RayExecutor);
    the outputs equal the single-device engine's."""
    text_for, tok = reference
    prompts = prompts_for(6)
    write_prompts(tmp_path / "in" / "p.parquet", {"pid": [f"t{i}" for i in range(6)], "prompt": prompts})
    cfg = make_config(tmp_path, input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(model_dir),
                      prompt_column="prompt", id_column="pid", tensor_parallel_size=2, num_replicas=1)
    summary = run_batch(cfg, progress=None)
    assert summary["status"] == "succeeded", summary
    rows = assert_exactly_once(read_output(str(tmp_path / "out" / "data")), "pid", [f"t{i}" for i in range(6)])
    for i, p in enumerate(prompts):
        assert rows[f"t{i}"]["generated_text"] == text_for(tok.encode_prompt(p)), f"row t{i}"


def test_dry_run_plans_without_ray_or_inference(model_dir, tmp_path, capsys, monkeypatch):
    """--dry-run: config checked, input listed and counted, prompt lengths sampled through the job's own
    preprocess, resume and replica requests reported; no Ray started, nothing written."""
    prompts = prompts_for(10) + [""]
    write_prompts(tmp_path / "in" / "a.parquet", {"prompt": prompts[:6]})
    write_prompts(tmp_path / "in" / "b.parquet", {"prompt": prompts[6:]})
    argv = ["--model", str(model_dir), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--prompt-column", "prompt", "--num-replicas", "2", "--max-replicas", "6", "--tensor-parallel-size", "2",
            "--dry-run"]
    import ray

    def no_ray(*a, **k):
        raise AssertionError("--dry-run must not start or connect to Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    assert cli_main(argv) == 0
    assert not (tmp_path / "out").exists()
    report = json.loads(capsys.readouterr().out)
    assert report["input"] == {**report["input"], "format": "parquet", "files": 2, "rows": 11}
    assert report["resume"] == {**report["resume"], "already_complete": False, "checkpointed_rows": 0,
                                "rows_to_run": 11}
    sample = report["prompt_tokens_sample"]
    assert sample["rows"] == 11 and sample["error_rows_by_kind"] == {"empty prompt": 1}
    assert 0 < sample["min"] <= sample["p50"] <= sample["max"]
    reps = report["replicas"]
    assert (reps["min"], reps["max"], reps["strategy"]) == (2, 6, "STRICT_PACK")
    assert reps["bundles"] == [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]  # default device: cuda
    assert reps["engine"]["dtype"] == "bfloat16" and reps["engine"]["tensor_parallel_size"] == 2
    # a bad config still fails as the job would
    assert cli_main(argv[:-1] + ["--prompt-column", "nope", "--dry-run"]) == 2


def test_prefix_aware_placement_streams_in_bounded_blocks(ray_cluster, model_dir, tmp_path):
    """Half of the rows share one system prompt (the skew that made the old global sort emit one block of half the
    input). The plan has no all-to-all operator (no barrier: output can be written while input is read), every
    block reaching the engine has at most batch_size rows, and rows sharing the prompt are neighbours within each
    window."""
    from ray.data._internal.logical.interfaces import LogicalOperator
    from ray.data._internal.logical.operators.all_to_all_operator import AbstractAllToAll

    from pipeline import formats
    from pipeline.batch import check_input, requests_dataset
    from pipeline.io import list_input_files
    from pipeline.stages import TOKEN_IDS

    system = "You are a careful assistant. Answer in one short sentence. " * 3
    n = 600
    prompts = [(system if i % 2 else "") + f"question {i}" for i in range(n)]
    write_prompts(tmp_path / "in.parquet", {"prompt": prompts}, row_group_size=100)
    cfg = make_config(tmp_path, input=str(tmp_path / "in.parquet"), output=str(tmp_path / "o"), model=str(model_dir),
                      prompt_column="prompt", batch_size=8, read_rows_per_task=100, prefix_window_rows=200)
    listing = list_input_files(cfg.input)
    fmt = formats.format_of(listing)
    ds = requests_dataset(fmt, cfg, listing, check_input(cfg, fmt, listing), cfg.storage, "id")

    def ops(op: LogicalOperator):
        yield op
        for dep in op.input_dependencies:
            yield from ops(dep)

    assert not [op.name for op in ops(ds._logical_plan.dag) if isinstance(op, AbstractAllToAll)]
    sizes, mixed = [], 0
    system_ids = tuple(glm4.load_tokenizer(model_dir).encode_prompt(system + "question 1")[:24])
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # one batch per block
        sizes.append(batch.num_rows)
        shared = {tuple(ids[:24]) == system_ids for ids in batch[TOKEN_IDS].to_pylist()}
        mixed += len(shared) > 1
    assert sum(sizes) == n and max(sizes) <= 8, sizes
    # In input order every other row has the system prompt, so nearly every 8-row block would mix both kinds; in
    # prefix order a block mixes them only at a window's edge (3 windows of 200 rows, two edges each at most).
    assert mixed <= 2 * (n // 200), mixed


@pytest.mark.parametrize("fmt_name", ["parquet", "openai-batch"])
def test_exactly_once_check_counts_the_same_in_one_task_and_by_hash_aggregation(ray_cluster, tmp_path, monkeypatch,
                                                                               fmt_name):
    """Small outputs are checked in one Ray task, large ones by a Ray Data hash aggregation: same answer."""
    import fsspec

    from pipeline import formats
    from pipeline import output_state as state

    fmt = formats.PARQUET if fmt_name == "parquet" else formats.OPENAI_BATCH
    ids = [["a", "b", "c"], ["d", "b", "e"], ["f", "a", "g"]]  # "a" and "b" twice
    files = []
    for k, chunk in enumerate(ids):
        path = tmp_path / f"part-{k}{fmt.out_suffix}"
        if fmt is formats.PARQUET:
            pq.write_table(pa.table({"id": chunk, "x": [1, 2, 3]}), path)
        else:
            path.write_text("".join(json.dumps({"id": i, "custom_id": i, "response": None}) + "\n" for i in chunk))
        files.append(str(path))
    fs = fsspec.filesystem("file")
    readers = formats.id_readers(fmt, "id")
    small = state.duplicate_ids(fs, files, "id", 9, *readers)
    monkeypatch.setattr(state, "ROWS_PER_ID_PARTITION", 4)  # 9 rows: the aggregation path, 3 partitions
    large = state.duplicate_ids(fs, files, "id", 9, *readers)
    assert small[:2] == large[:2] == (7, 2)
    assert sorted(small[2]) == sorted(large[2]) == ["a", "b"]
    assert state.null_ids(fs, files, readers[0]) == 0


def test_parquet_directory_without_a_prompt_source_is_refused_once_listed(tmp_path, model_dir, capsys):
    write_prompts(tmp_path / "in" / "a.parquet", {"prompt": ["a"]})
    base = ["--model", str(model_dir), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--dry-run"]
    assert cli_main(base) == 2
    assert "Parquet input: set exactly one of prompt_column and messages_column" in capsys.readouterr().err
    (tmp_path / "in" / "a.parquet").unlink()
    (tmp_path / "in" / "r.jsonl").write_text('{"custom_id": "x", "method": "POST", "url": "/v1/completions", '
                                             '"body": {"prompt": "hi", "max_tokens": 2}}\n')
    assert cli_main(base + ["--prompt-column", "prompt"]) == 2
    assert "OpenAI Batch request files (.jsonl)" in capsys.readouterr().err
    assert cli_main(base) == 0
    assert json.loads(capsys.readouterr().out)["input"]["rows"] == 1
