"""`run_batch(config)`: the batch inference job on Ray Data.

    read (PromptParquet datasource: stable ids derived in the read tasks, fine-grained tasks)
      -> [checkpoint filter: Ray Data drops ids already written by an earlier run]
      -> validate + tokenize (CPU tasks)
      -> prefix-aware order (bounded windows, streaming) -> blocks of batch_size rows
      -> engine replicas (autoscaling actor pool; each replica's placement group reserved before its actor)
      -> postprocess -> write_parquet (<output>/data, 2-phase checkpoint commit per file)
    then manifest.json (counted from the written files, in the cluster) and, last, _SUCCESS.

Exactly-once comes from Ray Data's own checkpointing (`CheckpointConfig` on the id column, Ray >= 2.54): each
written file's ids are committed next to it; a rerun of the same job filters those ids out at the read and
deletes files whose commit never happened. The checkpoint is removed only after _SUCCESS is written, so there
is no moment at which a crash could make a rerun redo finished rows.

The driver does O(files) work: listing and footers (in parallel), the manifest's sums of per-file statistics.
Output state (checkpoint repair, manifest, _SUCCESS) lives in `pipeline.output_state`, progress in
`pipeline.progress`, replica resources in `pipeline.placement`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import warnings
from typing import Any, Callable

import pyarrow as pa

from pipeline import formats
from pipeline import io as pio
from pipeline import output_state as state
from pipeline.config import BatchJobConfig, join_uri
from pipeline.output_state import (  # noqa: F401 (EXIT_* are part of this module's API: jobs/batch.py)
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TOO_MANY_ERRORS,
    changed_result_settings,
)
from pipeline.placement import ReplicaPlacement, ReplicaResources, ResourcesUnavailableError
from pipeline.progress import ProgressPrinter, ProgressTracker, safe_get
from pipeline.stages import EngineReplica, EngineSpec, prefix_order

logger = logging.getLogger(__name__)

_CHECKPOINT_DISABLED_WARNING = "You've enabled checkpointing, but the logical plan doesn't support checkpointing"


class BatchJobError(RuntimeError):
    """The job could not complete (the message says why); a rerun resumes where it stopped."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def replica_resources(config: BatchJobConfig) -> ReplicaResources:
    """What one replica asks Ray for: from the config only (device, tensor_parallel_size), never the cluster."""
    return ReplicaResources(device=config.device, tensor_parallel_size=config.tensor_parallel_size,
                            replica_num_cpus=config.replica_num_cpus, replica_memory=config.replica_memory)


class JobPaths:
    """Where a job reads and writes: output, data, markers and checkpoint, each with its filesystem."""

    def __init__(self, config: BatchJobConfig):
        storage = config.storage.resolved()
        self.storage = storage
        self.out_fs, self.out_path = pio.filesystem_for(config.output, storage)
        self.data_path = join_uri(self.out_path, "data")
        self.success = join_uri(self.out_path, "_SUCCESS")
        self.manifest = join_uri(self.out_path, "manifest.json")
        self.ckpt_fs, self.ckpt_path = pio.filesystem_for(config.resolved_checkpoint_uri, storage)


def run_batch(config: BatchJobConfig, *, progress: Callable[[str], None] | None = _stderr) -> dict[str, Any]:
    """Run (or resume, or skip if already finished) the batch job; return a summary dict.

    The summary has `status` ("succeeded" | "failed" | "skipped"), `exit_code` (0, or 3 when the error-row
    fraction exceeds max_error_fraction), row/token counts, throughput and the output locations. Raises
    `pipeline.io.StorageError` when storage is unreachable, `pipeline.io.InputError` / `ModelPathError` for bad
    inputs and `BatchJobError` when the pipeline fails or its resources never appear; in all those cases no
    _SUCCESS is written.
    """
    say = progress or (lambda _line: None)
    started = time.time()
    paths = JobPaths(config)
    out_fs = paths.out_fs

    if config.overwrite:
        pio.remove_tree(out_fs, paths.out_path)
        pio.remove_tree(paths.ckpt_fs, paths.ckpt_path)
    elif pio.exists(out_fs, paths.success):
        manifest = json.loads(pio.read_text(out_fs, paths.manifest) or "{}")
        say(f"[glm4-batch] {config.output} is already complete (_SUCCESS); nothing to do")
        changed = changed_result_settings(manifest.get("config") or {}, config.redacted())
        if changed:
            # Same output prefix, different job: the existing results are NOT what this config would produce.
            warning = (f"[glm4-batch] WARNING: the finished run in {config.output} used different settings "
                       f"({', '.join(changed)}); its results were kept. Use --overwrite or a new output prefix "
                       "to run this config.")
            say(warning)
            logger.warning(warning)
        return state.summary(manifest, status="skipped", exit_code=EXIT_OK)

    listing = pio.list_input_files(config.input, paths.storage)
    fmt = formats.format_of(listing)
    id_column = config.output_id_column
    read_columns = check_input(config, fmt, listing)
    state.settle_after_failed_run(config, out_fs, paths.data_path, paths.ckpt_fs, paths.ckpt_path)
    state.drop_half_committed_markers(paths.ckpt_fs, paths.ckpt_path)
    ckpt_files = state.committed_checkpoint_files(paths.ckpt_fs, paths.ckpt_path)
    if not ckpt_files and pio.list_files(out_fs, paths.data_path, fmt.out_suffix):
        raise pio.InputError(
            f"{config.data_uri} already holds results but there is no checkpoint at "
            f"{config.resolved_checkpoint_uri}: it is not a resumable run of this job. Use another output or "
            "--overwrite."
        )
    done_before = pio.count_parquet_rows(paths.ckpt_fs, ckpt_files)
    model_info = pio.model_fingerprint(config.model, paths.storage)
    _ensure_ray(config)
    with _ray_data_console(config):
        total = formats.count_input_rows(fmt, listing)
        snapshot, run_elapsed = _run(config, paths, fmt, listing, read_columns, id_column, total, done_before, say)
        return _finish(config, paths, fmt, listing, id_column, total, done_before, model_info, snapshot, started,
                       run_elapsed, say)


def _run(config: BatchJobConfig, paths: JobPaths, fmt, listing, read_columns: list[str], id_column: str, total: int,
         done_before: int, say: Callable[[str], None]) -> tuple[dict, float]:
    """The Ray Data execution: reserve the replicas, read -> engine -> write. Returns (progress snapshot, seconds)."""
    import ray

    out_fs = paths.out_fs
    say(
        f"[glm4-batch] {total} {'request lines' if fmt is formats.OPENAI_BATCH else 'rows'} in "
        f"{len(listing.files)} file(s); "
        + (f"resuming: {done_before} already done; " if done_before else "")
        + f"results -> {config.data_uri}"
    )

    tracker = ray.remote(num_cpus=0, max_restarts=0)(ProgressTracker).remote(total, done_before)
    printer = ProgressPrinter(tracker, say, config.progress_interval_s)
    resources = replica_resources(config)
    placement = ReplicaPlacement(resources)
    run_started = time.time()
    try:
        if config.id_column is not None:
            tracker.set_driver_phase.remote("checking input ids")
            _check_input_ids(config, listing)
        tracker.set_driver_phase.remote("resources pending")
        waited = placement.reserve(config.num_replicas, config.resource_timeout_s, say,
                                   interval_s=config.progress_interval_s)
        say(f"[glm4-batch] phase: {config.num_replicas} replica(s) placed after {waited:.0f}s, each "
            f"{resources.describe()}; starting engines")
        tracker.set_driver_phase.remote("replicas starting")
        _warn_if_cpu_starved(say)
        ds = _build_dataset(fmt, config, listing, read_columns, paths.storage, tracker, id_column, placement)
        _write(fmt, ds, config, out_fs, paths.data_path, paths.ckpt_fs, paths.ckpt_path, id_column)
    except ResourcesUnavailableError as e:
        raise BatchJobError(str(e)) from e
    except Exception as e:
        if isinstance(e, pio.InputError):
            raise
        state.FAILED_RUNS[config.output] = time.monotonic()
        if pio.is_storage_exception(e):
            raise pio.StorageError(
                f"storage failed during the run ({pio.describe_storage_exception(e)}); no _SUCCESS was written, "
                "rerun the same job to resume"
            ) from e
        text = str(e)  # a RayTaskError puts the traceback first and the cause last: keep both ends
        text = text if len(text) <= 2000 else text[:500] + " ... " + text[-1500:]
        raise BatchJobError(f"pipeline failed: {type(e).__name__}: {text}") from e
    finally:
        printer.stop()
        snapshot = safe_get(tracker.snapshot.remote())
        ray.kill(tracker)
        placement.release()
    return snapshot, time.time() - run_started


def _finish(config: BatchJobConfig, paths: JobPaths, fmt, listing, id_column: str, total: int, done_before: int,
            model_info: dict, snapshot: dict, started: float, run_elapsed: float,
            say: Callable[[str], None]) -> dict[str, Any]:
    """Count the written files (in the cluster), write manifest.json and, when every row is there, _SUCCESS."""
    out_fs = paths.out_fs
    resources = replica_resources(config)
    say("[glm4-batch] phase: counting the written results")
    files = pio.list_files(out_fs, paths.data_path, fmt.out_suffix)
    stats = state.collect_stats(out_fs, files, formats.stats_fn(fmt))
    distinct, n_dup, examples = state.duplicate_ids(out_fs, files, id_column, stats["rows"],
                                                    *formats.id_readers(fmt, id_column))
    manifest = state.build_manifest(
        config, listing=listing, rows_in=total, stats=stats, distinct_ids=distinct, duplicate_examples=examples,
        n_duplicates=n_dup, files_out=len(files), id_column=id_column, model_info=model_info, snap=snapshot,
        started=started, run_elapsed=run_elapsed, done_before=done_before,
        replicas={"min": config.replica_range[0], "max": config.replica_range[1],
                  "batches_in_flight": config.rows_in_flight_batches, "bundles": resources.bundles(),
                  "strategy": ReplicaPlacement.strategy, "started": snapshot.get("members", {})})
    ok = manifest["status"] == "succeeded"
    state.write_manifest(out_fs, paths.manifest, manifest)
    if ok:
        pio.write_text(out_fs, paths.success, "")
        if not config.keep_checkpoint:
            pio.remove_tree(paths.ckpt_fs, paths.ckpt_path)
    summary = state.summary(manifest, status=manifest["status"],
                            exit_code=EXIT_OK if ok else manifest.get("exit_code", EXIT_FAILED))
    say(state.final_line(summary))
    return summary


# --- planning -------------------------------------------------------------------------------------------------------
def check_input(config: BatchJobConfig, fmt, listing: pio.InputListing) -> list[str]:
    """Check the config against the listed input; return the input columns the job reads."""
    return _check_columns(config, listing.schema) if fmt is formats.PARQUET else _check_openai(config)


def _check_openai(config: BatchJobConfig) -> list[str]:
    """OpenAI Batch lines carry their own request: column settings would be silently ignored, so refuse them."""
    set_ = [k for k in ("prompt_column", "messages_column", "id_column", "sampling_params_column", "carry_columns")
            if getattr(config, k) is not None]
    if set_:
        raise pio.InputError(f"{config.input} holds OpenAI Batch request files (.jsonl): each line carries its own "
                             f"request and custom_id, so {', '.join(set_)} must not be set")
    return []


def _check_columns(config: BatchJobConfig, schema: pa.Schema) -> list[str]:
    if (config.prompt_column is None) == (config.messages_column is None):
        raise pio.InputError("Parquet input: set exactly one of prompt_column and messages_column")
    names = set(schema.names)
    needed = {
        "prompt_column": config.prompt_column,
        "messages_column": config.messages_column,
        "id_column": config.id_column,
        "sampling_params_column": config.sampling_params_column,
    }
    for what, col in needed.items():
        if col is not None and col not in names:
            raise pio.InputError(f"{what} {col!r} is not in the input (columns: {sorted(names)})")
    if config.id_column is None and config.output_id_column in names:
        raise pio.InputError(
            f"the input already has a column {config.output_id_column!r}: pass it as --id-column, or rename it "
            "(the derived row id would take that name)"
        )
    carry = list(schema.names) if config.carry_columns is None else list(config.carry_columns)
    unknown = [c for c in carry if c not in names]
    if unknown:
        raise pio.InputError(f"carry_columns not in the input: {unknown}")
    from pipeline.stages import OUTPUT_COLUMNS

    clash = [c for c in carry if c in OUTPUT_COLUMNS and c != config.id_column]
    if clash:
        raise pio.InputError(f"input columns {clash} would collide with output columns; leave them out of "
                             "carry_columns")
    cols = [c for c in needed.values() if c is not None] + carry
    return list(dict.fromkeys(cols))


def _check_input_ids(config: BatchJobConfig, listing: pio.InputListing) -> None:
    """The id column must be non-null and unique (the checkpoint and the exactly-once check rest on it). Checked
    in the cluster (Ray tasks, or a Ray Data aggregation for large inputs), never by reading ids into the driver."""
    col = config.id_column
    files = [f.path for f in listing.files]
    read_ids, ids_dataset = formats.id_readers(formats.PARQUET, col)
    nulls = state.null_ids(listing.fs, files, read_ids)
    if nulls:
        raise pio.InputError(f"id column {col!r} has {nulls} null value(s)")
    distinct, n_dup, examples = state.duplicate_ids(listing.fs, files, col, listing.num_rows, read_ids, ids_dataset)
    if n_dup:
        raise pio.InputError(
            f"id column {col!r} has {listing.num_rows - distinct} duplicate value(s), e.g. {examples}: ids must be "
            "unique for exactly-once results"
        )


def _warn_if_cpu_starved(say: Callable[[str], None]) -> None:
    """Reserved replicas hold their CPUs for the whole job; if they took (nearly) all of them, the read, tokenize and
    write tasks never run and Ray Data waits without an error. Warn (an autoscaling cluster may still add nodes)."""
    import ray

    free = ray.available_resources().get("CPU", 0.0)
    if free < 0.5:
        say(f"[glm4-batch] WARNING: the replicas' reservations leave {free:.2f} CPU free for the read, tokenize and "
            "write tasks: the job may stall. Lower replica_num_cpus (fractions are fine) or num_replicas.")


def _ensure_ray(config: BatchJobConfig) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=config.ray_address, log_to_driver=True)


def requests_dataset(fmt, config: BatchJobConfig, listing: pio.InputListing, read_columns: list[str], storage,
                     id_column: str):
    """Everything before the engine: read -> validate + tokenize -> prefix-aware order -> batch_size blocks.

    Every step streams: no operator waits for all of the input, and no block exceeds max(batch_size, the read
    task's rows) whatever the prefix distribution (tests/pipeline/test_batch_stages.py checks both)."""
    ds = formats.read(fmt, config, listing, read_columns, id_column)
    ds = formats.preprocess(fmt, ds, config, storage, id_column)
    if config.prefix_aware:
        # Trie order inside bounded windows: rows sharing leading tokens become neighbours and travel in the same
        # batches to the same replica, whose prefix cache then serves the shared part once. Streaming: a window
        # is ordered as soon as its rows are tokenized (no global sort, no barrier, no oversized block).
        ds = ds.map_batches(prefix_order, fn_kwargs={"prefix_tokens": config.prefix_tokens},
                            batch_format="pyarrow", batch_size=config.prefix_window_rows, num_cpus=0.25)
    return ds.repartition(target_num_rows_per_block=config.batch_size)


def _build_dataset(fmt, config, listing, read_columns, storage, tracker, id_column, placement: ReplicaPlacement):
    import ray.data

    ds = requests_dataset(fmt, config, listing, read_columns, storage, id_column)

    llm_kwargs = config.engine.llm_kwargs(config.tensor_parallel_size, config.device)
    if config.tensor_parallel_size > 1:
        # Rank 0 lives in the replica actor; ranks 1..tp-1 are Ray actors that the executor places in bundles
        # 1..tp-1 of the replica's placement group (reserved before the replica actor; see pipeline.placement).
        llm_kwargs.setdefault("executor", "pipeline.tp_ray:RayExecutor")
    engine = EngineSpec(
        model=config.model,
        storage=storage,
        model_cache_dir=config.model_cache_dir,
        llm_kwargs=llm_kwargs,
        torch_threads=config.torch_threads,
        tracker=tracker,
        max_engine_restarts=config.max_engine_restarts,
    )
    lo, hi = config.replica_range
    ds = placement.map_batches(
        ds,
        EngineReplica,
        fn_constructor_kwargs={"spec": engine},
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            min_size=lo, max_size=hi, max_concurrent_calls_per_actor=config.rows_in_flight_batches
        ),
    )
    return formats.postprocess(fmt, ds, config, storage, listing, read_columns, id_column)


@contextlib.contextmanager
def _ray_data_console(config: BatchJobConfig):
    """Ray Data's own progress output (bars, or on a non-terminal periodic log lines) only when asked for: the
    job prints its own progress. Applies to every dataset the job creates (run and manifest), then restores."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = config.ray_progress_bars
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved


def _write(fmt, ds, config, out_fs, data_path, ckpt_fs, ckpt_path, id_column) -> None:
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    ctx = ray.data.DataContext.get_current()
    saved = ctx.checkpoint_config
    ctx.checkpoint_config = CheckpointConfig(
        id_column=id_column,
        checkpoint_path=pio.ray_uri(ckpt_fs, ckpt_path),
        delete_checkpoint_on_success=False,  # removed by us, after _SUCCESS (see module docstring)
        override_filesystem=pio.arrow_filesystem(ckpt_fs),
    )
    # The dataset captured the context when it was created; give it the checkpoint config too.
    ds.context.checkpoint_config = ctx.checkpoint_config
    try:
        with warnings.catch_warnings():
            # Without checkpointing a rerun would duplicate rows: refuse to run rather than warn. (Ray 2.60 accepts
            # any plan that ends in a write, so today this never fires; it guards against a stricter Ray.)
            warnings.filterwarnings("error", message=_CHECKPOINT_DISABLED_WARNING)
            formats.write(fmt, ds, config, out_fs, data_path)
    finally:
        ctx.checkpoint_config = saved


__all__ = ["BatchJobError", "EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "EXIT_TOO_MANY_ERRORS", "changed_result_settings",
           "replica_resources", "run_batch"]
