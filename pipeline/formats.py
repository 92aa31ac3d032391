"""The two input/output formats of a batch job, behind one interface:

* `parquet`: a prompt or messages column in, Parquet results (id, carried columns, result columns) out.
* `openai-batch`: OpenAI Batch request files (`.jsonl`) in, OpenAI Batch output files (`.jsonl`) out.

Both share everything between the read and the write: the checkpoint id column, prefix-aware order, the engine
replicas, exactly-once resume, manifest and `_SUCCESS`. A format says how rows are read, turned into engine
requests, turned into output records and written, and how the written files are counted for the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io as pio
from pipeline import output_state as state
from pipeline.config import BatchJobConfig, StorageOptions
from pipeline.progress import error_kind


@dataclass(frozen=True)
class Format:
    name: str
    out_suffix: str


PARQUET = Format("parquet", ".parquet")
OPENAI_BATCH = Format("openai-batch", ".jsonl")


def format_of(listing: pio.InputListing) -> Format:
    return OPENAI_BATCH if listing.format == "jsonl" else PARQUET


# --- reading ---------------------------------------------------------------------------------------------------------
def read(fmt: Format, config: BatchJobConfig, listing: pio.InputListing, read_columns: list[str], id_column: str):
    import ray.data

    if fmt is OPENAI_BATCH:
        from pipeline.openai_batch import make_jsonl_datasource

        source = make_jsonl_datasource(listing.fs, [(f.path, f.rel, f.size) for f in listing.files],
                                       id_column=id_column, bytes_per_task=config.read_bytes_per_task)
    else:
        derived = None if config.id_column is not None else id_column
        source = pio.make_prompt_datasource(listing, read_columns, derive_id_column=derived,
                                            rows_per_task=config.read_rows_per_task)
    return ray.data.read_datasource(source, num_cpus=0.25)


def count_input_rows(fmt: Format, listing: pio.InputListing) -> int:
    """Rows of the input: Parquet footers (already read by the listing); request lines of .jsonl files, counted by
    Ray tasks next to the data (one small int per file reaches the driver)."""
    if fmt is PARQUET:
        return listing.num_rows
    import ray

    task = ray.remote(num_cpus=0.25, max_retries=3)(count_request_lines)
    return sum(ray.get([task.remote(listing.fs, f.path) for f in listing.files]))


def count_request_lines(fs, path: str) -> int:
    n = 0
    with pio.storage_errors(f"counting lines of {path}"):
        with fs.open(path, "rb") as f:
            for line in f:
                n += bool(line.strip())
    return n


# --- engine requests and output records ---------------------------------------------------------------------------
def preprocess(fmt: Format, ds, config: BatchJobConfig, storage: StorageOptions, id_column: str):
    if fmt is OPENAI_BATCH:
        from pipeline.openai_batch import preprocess_openai_batch

        fn, spec = preprocess_openai_batch, openai_spec(config, storage, id_column)
    else:
        from pipeline.stages import preprocess_batch

        fn, spec = preprocess_batch, parquet_preprocess_spec(config, storage)
    return ds.map_batches(fn, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=None,
                          num_cpus=config.preprocess_num_cpus)


def parquet_preprocess_spec(config: BatchJobConfig, storage: StorageOptions):
    from pipeline.stages import PreprocessSpec

    return PreprocessSpec(
        model=config.model, storage=storage, model_cache_dir=config.model_cache_dir,
        prompt_column=config.prompt_column, messages_column=config.messages_column,
        sampling_params_column=config.sampling_params_column, default_params=config.sampling.as_params(),
        max_model_len=config.engine.max_model_len)


def postprocess(fmt: Format, ds, config: BatchJobConfig, storage: StorageOptions, listing: pio.InputListing,
                read_columns: list[str], id_column: str):
    if fmt is OPENAI_BATCH:
        from pipeline.openai_batch import postprocess_openai_batch

        fn, spec = postprocess_openai_batch, openai_spec(config, storage, id_column)
    else:
        from pipeline.stages import PostprocessSpec, postprocess_batch

        carry = list(listing.schema.names) if config.carry_columns is None else list(config.carry_columns)
        fn, spec = postprocess_batch, PostprocessSpec(
            id_column=id_column, carry_columns=tuple(c for c in carry if c in read_columns))
    return ds.map_batches(fn, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=None, num_cpus=0.25)


def openai_spec(config: BatchJobConfig, storage: StorageOptions, id_column: str):
    from pipeline.openai_batch import OpenAIBatchSpec

    return OpenAIBatchSpec(model=config.model, storage=storage, model_cache_dir=config.model_cache_dir,
                           id_column=id_column, max_model_len=config.engine.max_model_len)


def write(fmt: Format, ds, config: BatchJobConfig, out_fs, data_path: str) -> None:
    if fmt is OPENAI_BATCH:
        from pipeline.openai_batch import JsonlLinesDatasink

        ds.write_datasink(JsonlLinesDatasink(pio.ray_uri(out_fs, data_path), filesystem=pio.arrow_filesystem(out_fs),
                                             min_rows_per_file=config.rows_per_file))
    else:
        ds.write_parquet(pio.ray_uri(out_fs, data_path), filesystem=pio.arrow_filesystem(out_fs),
                         min_rows_per_file=config.rows_per_file)


# --- counting the written files -------------------------------------------------------------------------------------
def stats_fn(fmt: Format):
    return jsonl_file_stats if fmt is OPENAI_BATCH else state.parquet_file_stats


def jsonl_file_stats(fs, paths: list[str]) -> dict[str, Any]:
    """Counts of a group of OpenAI Batch output files (a Ray task): an error row is a line without a 200 response
    (its kind: the error code, or the response body's error code)."""
    acc = state.empty_stats()
    for p in paths:
        part = state.empty_stats()
        with pio.storage_errors(f"reading result statistics of {p}"):
            with fs.open(p, "rb") as f:
                for raw in f:
                    if not raw.strip():
                        continue
                    rec = json.loads(raw)
                    part["rows"] += 1
                    resp = rec.get("response") or {}
                    body = resp.get("body") or {}
                    if rec.get("error") is not None or resp.get("status_code") != 200:
                        err = rec.get("error") or body.get("error") or {}
                        kind = err.get("code") or err.get("type") or error_kind(err.get("message") or "error")
                        part["errors"] += 1
                        part["error_kinds"][kind] = part["error_kinds"].get(kind, 0) + 1
                        continue
                    usage = body.get("usage") or {}
                    part["prompt_tokens"] += usage.get("prompt_tokens", 0)
                    part["ok_prompt_tokens"] += usage.get("prompt_tokens", 0)
                    part["generated_tokens"] += usage.get("completion_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    part["ok_cached_tokens"] += details.get("cached_tokens") or 0
                    for choice in body.get("choices", []):
                        r = str(choice.get("finish_reason"))
                        part["finish_reasons"][r] = part["finish_reasons"].get(r, 0) + 1
        state.add_stats(acc, part)
    return acc


def id_readers(fmt: Format, id_column: str):
    """(read_ids(fs, path) -> pa.Array, ids_dataset(fs, files, id_column) -> Dataset) of the written files."""
    if fmt is PARQUET:
        def read_ids(fs, path: str) -> pa.Array:
            with fs.open(path, "rb") as f:
                try:
                    return pq.read_table(f, columns=[id_column])[id_column].combine_chunks()
                except (pa.ArrowException, OSError) as e:
                    if pio.names_unreachable_storage(e):
                        raise
                    # a corrupt page: pyarrow names neither the file nor the column, and a rerun will not help
                    raise pio.InputError(f"file {path}: cannot read column {id_column!r}: {e}") from e

        def ids_dataset(fs, files: list[str], column: str):
            import ray.data

            return ray.data.read_parquet([pio.ray_uri(fs, p) for p in files], filesystem=pio.arrow_filesystem(fs),
                                         columns=[column], num_cpus=0.25)
        return read_ids, ids_dataset

    def read_line_ids(fs, path: str) -> pa.Array:
        # The output line's "id" is derived from the row's stable id (batch_req_<hash>): one per input line.
        with fs.open(path, "rb") as f:
            return pa.array([json.loads(line)["id"] for line in f if line.strip()], pa.string())

    def line_ids_dataset(fs, files: list[str], column: str):
        import ray.data

        def line_ids(t: pa.Table) -> pa.Table:
            return pa.table({column: [json.loads(x)["id"] for x in t["text"].to_pylist() if x.strip()]})

        return ray.data.read_text([pio.ray_uri(fs, p) for p in files], filesystem=pio.arrow_filesystem(fs),
                                  num_cpus=0.25).map_batches(line_ids, batch_format="pyarrow", num_cpus=0.25)
    return read_line_ids, line_ids_dataset
