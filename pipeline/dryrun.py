"""`glm4-batch --dry-run`: everything a batch job checks and plans, without Ray and without inference.

Validates the config, lists and counts the input (files, rows: Parquet footers and .jsonl line counts, read in
parallel), samples prompt lengths from a few files (tokenized as the job would), reports what a resume would skip
(the committed checkpoint) and what each replica will request from Ray. Driver memory is O(files + sample): no
per-row state, so a 100M-row input costs what a 100-row one does (bench/dry_run_memory.py measures it).
"""

from __future__ import annotations

import json
import statistics
from typing import Any, Callable

from pipeline import formats
from pipeline import io as pio
from pipeline import output_state as state
from pipeline.config import BatchJobConfig, redact_uri
from pipeline.placement import ReplicaPlacement

SAMPLE_FILES = 8
SAMPLE_ROWS_PER_FILE = 64
SAMPLE_BYTES_PER_FILE = 1 << 20


def dry_run(config: BatchJobConfig, *, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The plan of this job as a JSON-able dict (raises InputError / ModelPathError / StorageError like the job)."""
    from pipeline.batch import JobPaths, check_input, replica_resources

    paths = JobPaths(config)
    listing = pio.list_input_files(config.input, paths.storage)
    fmt = formats.format_of(listing)
    check_input(config, fmt, listing)
    rows = listing.num_rows if fmt is formats.PARQUET else sum(
        pio.parallel(lambda f: formats.count_request_lines(listing.fs, f.path), list(listing.files)))
    finished = pio.exists(paths.out_fs, paths.success)
    ckpt_files = state.committed_checkpoint_files(paths.ckpt_fs, paths.ckpt_path)
    done = pio.count_parquet_rows(paths.ckpt_fs, ckpt_files)
    model = pio.model_fingerprint(config.model, paths.storage)
    sample = _sample_prompt_lengths(config, fmt, listing, paths.storage)
    resources = replica_resources(config)
    lo, hi = config.replica_range
    report = {
        "config": "valid",
        "input": {"uri": redact_uri(config.input), "format": listing.format, "files": len(listing.files),
                  "rows": rows, "bytes": sum(f.size for f in listing.files)},
        "resume": {"already_complete": finished, "checkpointed_rows": done, "rows_to_run": 0 if finished else
                   max(rows - done, 0), "checkpoint": redact_uri(config.resolved_checkpoint_uri)},
        "prompt_tokens_sample": sample,
        "replicas": {"min": lo, "max": hi, "each_requests": resources.describe(), "bundles": resources.bundles(),
                     "strategy": ReplicaPlacement.strategy, "batches_in_flight": config.rows_in_flight_batches,
                     "rows_in_flight": config.rows_in_flight_batches * config.batch_size,
                     "engine": config.engine.llm_kwargs(config.tensor_parallel_size, config.device)},
        "model": {"uri": redact_uri(config.model), "weights": model["weights"],
                  "architectures": (model.get("config") or {}).get("architectures")},
        "output": {"uri": redact_uri(config.output), "data": redact_uri(config.data_uri)},
    }
    if say is not None:
        say(f"[glm4-batch] dry run: {rows} rows in {len(listing.files)} file(s); "
            + ("already complete" if finished else f"{report['resume']['rows_to_run']} to run")
            + f"; {lo}..{hi} replica(s), each {resources.describe()}")
    return report


def _sample_prompt_lengths(config: BatchJobConfig, fmt, listing: pio.InputListing, storage) -> dict[str, Any]:
    """Token counts of up to SAMPLE_ROWS_PER_FILE rows of the first SAMPLE_FILES files, through the job's own
    preprocess stage (so bad rows count as the job would count them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.stages import ERROR_IN, TOKEN_IDS

    tables = []
    for f in listing.files[:SAMPLE_FILES]:
        with pio.storage_errors(f"sampling {f.path}"):
            if fmt is formats.PARQUET:
                if not f.num_rows:
                    continue
                with listing.fs.open(f.path, "rb") as fh:
                    cols = [c for c in (config.prompt_column, config.messages_column, config.sampling_params_column)
                            if c]
                    t = pq.ParquetFile(fh).read_row_group(0, columns=cols).slice(0, SAMPLE_ROWS_PER_FILE)
            else:
                from pipeline.openai_batch.reader import read_range

                parts = list(read_range(listing.fs, f.path, f.rel, 0, min(f.size, SAMPLE_BYTES_PER_FILE), "id"))
                t = pa.concat_tables(parts).slice(0, SAMPLE_ROWS_PER_FILE) if parts else None
        if t is not None and t.num_rows:
            tables.append(_preprocess(fmt, t, config, storage))
    if not tables:
        return {"rows": 0}
    lengths, errors = [], {}
    for t in tables:
        for ids, err in zip(t[TOKEN_IDS].to_pylist(), t[ERROR_IN].to_pylist()):
            if err is None:
                lengths.append(len(ids))
            else:
                kind = err.split(":", 1)[0]
                errors[kind] = errors.get(kind, 0) + 1
    out: dict[str, Any] = {"rows": len(lengths) + sum(errors.values()), "error_rows_by_kind": errors}
    if lengths:
        q = statistics.quantiles(lengths, n=100, method="inclusive") if len(lengths) > 1 else lengths * 99
        out.update(min=min(lengths), p50=q[49], p90=q[89], p99=q[98], max=max(lengths),
                   mean=round(statistics.fmean(lengths), 1))
    return out


def _preprocess(fmt, table, config: BatchJobConfig, storage):
    if fmt is formats.OPENAI_BATCH:
        from pipeline.openai_batch import preprocess_openai_batch

        return preprocess_openai_batch(table, formats.openai_spec(config, storage, "id"))
    from pipeline.stages import preprocess_batch

    return preprocess_batch(table, formats.parquet_preprocess_spec(config, storage))


def format_report(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str)
