"""`run_batch(config)`: the batch inference job on Ray Data.

    read (PromptParquet datasource: stable ids, fine-grained tasks)
      -> [checkpoint filter: Ray Data drops ids already written by an earlier run]
      -> validate + tokenize (CPU tasks)
      -> prefix-aware ordering (sort by the leading token ids)
      -> engine replicas (actor pool, one glm4.LLM each, several batches in flight)
      -> postprocess -> write_parquet (<output>/data, 2-phase checkpoint commit per file)
    then manifest.json and, last, _SUCCESS.

Exactly-once comes from Ray Data's own checkpointing (`CheckpointConfig` on the id column, Ray >= 2.54): each
written file's ids are committed next to it; a rerun of the same job filters those ids out at the read and
deletes files whose commit never happened. The checkpoint is removed only after _SUCCESS is written, so there
is no moment at which a crash could make a rerun redo finished rows.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import threading
import time
import warnings
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import io as pio
from pipeline.config import BatchJobConfig, join_uri, redact_uri
from pipeline.stages import (
    PREFIX_KEY,
    EngineReplica,
    EngineSpec,
    PostprocessSpec,
    PreprocessSpec,
    postprocess_batch,
    preprocess_batch,
)

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_TOO_MANY_ERRORS = 3
_CHECKPOINT_DISABLED_WARNING = "You've enabled checkpointing, but the logical plan doesn't support checkpointing"


class BatchJobError(RuntimeError):
    """The job could not complete (the message says why); a rerun resumes where it stopped."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_batch(config: BatchJobConfig, *, progress: Callable[[str], None] | None = _stderr) -> dict[str, Any]:
    """Run (or resume, or skip if already finished) the batch job; return a summary dict.

    The summary has `status` ("succeeded" | "failed" | "skipped"), `exit_code` (0, or 3 when the error-row
    fraction exceeds max_error_fraction), row/token counts, throughput and the output locations. Raises
    `pipeline.io.StorageError` when storage is unreachable, `pipeline.io.InputError` / `ModelPathError` for bad
    inputs and `BatchJobError` when the pipeline fails; in all those cases no _SUCCESS is written.
    """
    say = progress or (lambda _line: None)
    started = time.time()
    storage = config.storage.resolved()
    out_fs, out_path = pio.filesystem_for(config.output, storage)
    data_path = join_uri(out_path, "data")
    success_path = join_uri(out_path, "_SUCCESS")
    manifest_path = join_uri(out_path, "manifest.json")
    ckpt_fs, ckpt_path = pio.filesystem_for(config.resolved_checkpoint_uri, storage)

    if config.overwrite:
        pio.remove_tree(out_fs, out_path)
        pio.remove_tree(ckpt_fs, ckpt_path)
    elif pio.exists(out_fs, success_path):
        manifest = json.loads(pio.read_text(out_fs, manifest_path) or "{}")
        say(f"[glm4-batch] {config.output} is already complete (_SUCCESS); nothing to do")
        changed = changed_result_settings(manifest.get("config") or {}, config.redacted())
        if changed:
            # Same output prefix, different job: the existing results are NOT what this config would produce.
            warning = (f"[glm4-batch] WARNING: the finished run in {config.output} used different settings "
                       f"({', '.join(changed)}); its results were kept. Use --overwrite or a new output prefix "
                       "to run this config.")
            say(warning)
            logger.warning(warning)
        return _summary(manifest, status="skipped", exit_code=EXIT_OK)

    listing = pio.list_input_files(config.input, storage)
    id_column = config.output_id_column
    read_columns = _check_columns(config, listing.schema)
    input_ids = _input_ids(config, listing)
    _settle_after_failed_run(config, out_fs, data_path, ckpt_fs, ckpt_path)
    _drop_half_committed_markers(ckpt_fs, ckpt_path)
    ckpt_files = [p for p in pio.list_files(ckpt_fs, ckpt_path, ".parquet") if not p.endswith(PENDING_SUFFIX)]
    if not ckpt_files and pio.list_files(out_fs, data_path, ".parquet"):
        raise pio.InputError(
            f"{config.data_uri} already holds results but there is no checkpoint at "
            f"{config.resolved_checkpoint_uri}: it is not a resumable run of this job. Use another output or "
            "--overwrite."
        )
    done_before = pio.count_parquet_rows(ckpt_fs, ckpt_files)
    model_info = pio.model_fingerprint(config.model, storage)
    total = len(input_ids)
    say(
        f"[glm4-batch] {total} rows in {len(listing.files)} file(s); "
        + (f"resuming: {done_before} already done; " if done_before else "")
        + f"results -> {config.data_uri}"
    )

    _ensure_ray(config)
    import ray

    tracker = ray.remote(num_cpus=0, max_restarts=0)(ProgressTracker).remote(total, done_before)
    printer = _ProgressPrinter(tracker, say, config.progress_interval_s)
    run_started = time.time()
    try:
        ds = _build_dataset(config, listing, read_columns, storage, tracker, id_column)
        _write(ds, config, out_fs, data_path, ckpt_fs, ckpt_path, id_column)
    except Exception as e:
        _FAILED_RUNS[config.output] = time.monotonic()
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
        snapshot = _safe_get(tracker.snapshot.remote())
        ray.kill(tracker)
    run_elapsed = time.time() - run_started

    manifest = _manifest(config, listing, input_ids, out_fs, data_path, id_column, model_info, snapshot,
                         started, run_elapsed, done_before)
    ok = manifest["status"] == "succeeded"
    pio.write_text(out_fs, manifest_path, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    if ok:
        pio.write_text(out_fs, success_path, "")
        if not config.keep_checkpoint:
            pio.remove_tree(ckpt_fs, ckpt_path)
    summary = _summary(manifest, status=manifest["status"],
                       exit_code=EXIT_OK if ok else manifest.get("exit_code", EXIT_FAILED))
    say(_final_line(summary))
    return summary


# Outputs whose execution failed in THIS process (output uri -> when). Tasks of a failed execution die with their
# owner only when the driver process exits; in a long-lived process (a service calling run_batch, the tests) a
# Write task of the failed attempt can still finish its data write or checkpoint commit while the rerun's
# checkpoint recovery is deleting "uncommitted" data, losing rows. A rerun in the same process therefore first
# waits for the output to stop changing.
_FAILED_RUNS: dict[str, float] = {}
SETTLE_QUIET_S = 10.0
SETTLE_TIMEOUT_S = 180.0


def _settle_after_failed_run(config: BatchJobConfig, out_fs, data_path: str, ckpt_fs, ckpt_path: str) -> None:
    if _FAILED_RUNS.pop(config.output, None) is None:
        return
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last: list[str] | None = None
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        try:
            for fs in (ckpt_fs, out_fs):
                fs.invalidate_cache()  # s3fs caches listings; we need to see the other attempt's writes
            snapshot = sorted(pio.list_files(ckpt_fs, ckpt_path, ".parquet") + pio.list_files(out_fs, data_path,
                                                                                                ".parquet"))
        except pio.StorageError:
            snapshot = None  # store still unreachable: keep waiting, recovery would fail anyway
        if snapshot is None or snapshot != last:
            last, quiet_since = snapshot, time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLE_QUIET_S:
            return
        time.sleep(1.0)
    logger.warning("output %s kept changing for %.0fs after the failed run; resuming anyway", config.output,
                   SETTLE_TIMEOUT_S)


# Settings that change what a row's result is (not how fast or where it runs).
RESULT_SETTINGS = ("input", "model", "prompt_column", "messages_column", "id_column", "sampling_params_column",
                   "sampling", "engine.dtype", "engine.max_model_len", "engine.seed")


def changed_result_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Which RESULT_SETTINGS differ between a finished run's manifest config and this job's (redacted) config."""
    def get(d: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    if not old:
        return []
    return [k for k in RESULT_SETTINGS if get(old, k) != get(new, k)]


PENDING_SUFFIX = ".pending.parquet"


def _drop_half_committed_markers(fs, ckpt_path: str) -> None:
    """Finish checkpoint commits that an outage interrupted half-way, before Ray Data's recovery runs.

    Ray Data commits a written file by renaming `X.pending.parquet` to `X.parquet`. On object storage a rename
    is a copy then a delete; if the store goes away between the two, both files remain. Ray's recovery (2.60)
    then deletes the data file of every pending checkpoint but keeps the committed one, so those rows count as
    done while their results are gone. The commit only starts after the data file was written completely, so a
    committed `X.parquet` proves the data is there: the stale pending marker is what must go.
    """
    files = set(pio.list_files(fs, ckpt_path, ".parquet"))
    for p in sorted(files):
        if p.endswith(PENDING_SUFFIX) and p[: -len(PENDING_SUFFIX)] + ".parquet" in files:
            logger.info("completing an interrupted checkpoint commit: removing %s", p)
            with pio.storage_errors(f"removing {p}"):
                fs.rm_file(p)


# --- planning -------------------------------------------------------------------------------------------------------
def _check_columns(config: BatchJobConfig, schema: pa.Schema) -> list[str]:
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


def _input_ids(config: BatchJobConfig, listing: pio.InputListing) -> pa.Array:
    """Every input id (derived or read from the id column), checked unique and non-null: the checkpoint and the
    exactly-once check both rest on it."""
    if config.id_column is None:
        return pa.array([i for f in listing.files for i in pio.derived_ids(f, 0, f.num_rows)], pa.string())
    ids = pio.read_parquet_columns(listing.fs, [f.path for f in listing.files], [config.id_column])
    ids = ids[config.id_column].combine_chunks()
    if ids.null_count:
        raise pio.InputError(f"id column {config.id_column!r} has {ids.null_count} null value(s)")
    n_unique = len(pc.unique(ids))
    if n_unique != len(ids):
        counts = pc.value_counts(ids)
        dup = [c["values"] for c in counts.to_pylist() if c["counts"] > 1][:5]
        raise pio.InputError(
            f"id column {config.id_column!r} has {len(ids) - n_unique} duplicate value(s), e.g. {dup}: ids must be "
            "unique for exactly-once results"
        )
    return ids


def _ensure_ray(config: BatchJobConfig) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=config.ray_address, log_to_driver=True)


def _warn_if_cpu_starved(config: BatchJobConfig) -> None:
    """Replicas hold their CPUs for the whole job; if they take (nearly) all of them, the read/tokenize/write
    tasks never get scheduled and Ray Data waits forever without an error. Warn (an autoscaling cluster may
    still add nodes, so this is not an error)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    held = config.num_replicas * config.replica_num_cpus
    if cpus - held < 1:
        logger.warning(
            "the %d replica(s) reserve %.2f of the cluster's %.2f CPUs, leaving less than 1 for the read, tokenize "
            "and write tasks: the job may stall. Lower replica_num_cpus (fractions are fine) or num_replicas.",
            config.num_replicas, held, cpus)


def _use_gpu(config: BatchJobConfig) -> bool:
    import ray

    if config.use_gpu is not None:
        return config.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def _build_dataset(config, listing, read_columns, storage, tracker, id_column):
    import ray
    import ray.data

    derived = None if config.id_column is not None else id_column
    source = pio.make_prompt_datasource(listing, read_columns, derive_id_column=derived,
                                        rows_per_task=config.read_rows_per_task)
    ds = ray.data.read_datasource(source, num_cpus=0.25)
    pre = PreprocessSpec(
        model=config.model,
        storage=storage,
        model_cache_dir=config.model_cache_dir,
        prompt_column=config.prompt_column,
        messages_column=config.messages_column,
        sampling_params_column=config.sampling_params_column,
        default_params=config.sampling.as_params(),
        max_model_len=config.engine.max_model_len,
        prefix_tokens=config.prefix_tokens,
    )
    ds = ds.map_batches(preprocess_batch, fn_kwargs={"spec": pre}, batch_format="pyarrow", batch_size=None,
                        num_cpus=config.preprocess_num_cpus)
    if config.prefix_aware:
        # Trie order: rows sharing leading tokens become neighbours, so they travel in the same blocks to the same
        # replica and its prefix cache serves the shared part once.
        ds = ds.sort(PREFIX_KEY)
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)

    _warn_if_cpu_starved(config)
    use_gpu = _use_gpu(config)
    llm_kwargs = config.engine.llm_kwargs(config.tensor_parallel_size)
    llm_kwargs.setdefault("device", "cuda" if use_gpu else "cpu")
    tp = config.tensor_parallel_size
    if tp > 1:
        # Rank 0 lives in the replica actor (one GPU); ranks 1..tp-1 are Ray actors that the executor places in a
        # STRICT_PACK placement group on the replica's node, so a replica never spans nodes and Ray tears the
        # workers down with the replica.
        llm_kwargs.setdefault("executor", "pipeline.tp_ray:RayExecutor")
    ray_executor = tp > 1 and str(llm_kwargs.get("executor")) == "pipeline.tp_ray:RayExecutor"
    engine = EngineSpec(
        model=config.model,
        storage=storage,
        model_cache_dir=config.model_cache_dir,
        llm_kwargs=llm_kwargs,
        torch_threads=config.torch_threads,
        tracker=tracker,
        max_engine_restarts=config.max_engine_restarts,
    )
    ds = ds.map_batches(
        EngineReplica,
        fn_constructor_kwargs={"spec": engine},
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            size=config.num_replicas, max_concurrent_calls_per_actor=config.batches_in_flight
        ),
        num_cpus=config.replica_num_cpus,
        num_gpus=(1 if ray_executor else tp) if use_gpu else 0,
        **({"memory": config.replica_memory} if config.replica_memory else {}),
    )
    carry = list(listing.schema.names) if config.carry_columns is None else list(config.carry_columns)
    post = PostprocessSpec(id_column=id_column, carry_columns=tuple(c for c in carry if c in read_columns))
    return ds.map_batches(postprocess_batch, fn_kwargs={"spec": post}, batch_format="pyarrow", batch_size=None,
                          num_cpus=0.25)


def _write(ds, config, out_fs, data_path, ckpt_fs, ckpt_path, id_column) -> None:
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.checkpoint_config, ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
    ctx.checkpoint_config = CheckpointConfig(
        id_column=id_column,
        checkpoint_path=pio.ray_uri(ckpt_fs, ckpt_path),
        delete_checkpoint_on_success=False,  # removed by us, after _SUCCESS (see module docstring)
        override_filesystem=pio.arrow_filesystem(ckpt_fs),
    )
    ctx.enable_progress_bars = config.ray_progress_bars
    ctx.enable_operator_progress_bars = config.ray_progress_bars
    # The dataset captured the context when it was created; give it the checkpoint config too.
    ds.context.checkpoint_config = ctx.checkpoint_config
    ds.context.enable_progress_bars = config.ray_progress_bars
    ds.context.enable_operator_progress_bars = config.ray_progress_bars
    try:
        with warnings.catch_warnings():
            # Without checkpointing a rerun would duplicate rows: refuse to run rather than warn.
            warnings.filterwarnings("error", message=_CHECKPOINT_DISABLED_WARNING)
            ds.write_parquet(
                pio.ray_uri(out_fs, data_path),
                filesystem=pio.arrow_filesystem(out_fs),
                min_rows_per_file=config.rows_per_file,
            )
    finally:
        ctx.checkpoint_config, ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved


# --- progress -------------------------------------------------------------------------------------------------------
class ProgressTracker:
    """Counts rows as the engine replicas finish them and keeps each replica's latest engine stats.

    Runs as a Ray actor (`num_cpus=0`). Counts are for the console and the dashboard; a retried batch may be
    counted twice. The manifest's counts come from the written files instead.
    """

    def __init__(self, total: int, done_before: int):
        self.total, self.done_before = total, done_before
        self.rows = self.errors = self.prompt_tokens = self.gen_tokens = 0
        self.kinds: dict[str, int] = {}
        self.replicas: dict[str, dict] = {}
        self.engine_deaths: dict[str, str] = {}
        self.t0 = time.time()
        self._metrics = _make_metrics()

    def add(self, rows: int, errors: int, prompt_tokens: int, gen_tokens: int, kinds: dict[str, int]) -> None:
        self.rows += rows
        self.errors += errors
        self.prompt_tokens += prompt_tokens
        self.gen_tokens += gen_tokens
        for k, v in kinds.items():
            self.kinds[k] = self.kinds.get(k, 0) + v
        if self._metrics:
            m = self._metrics
            m["rows"].inc(rows)
            if errors:
                m["errors"].inc(errors)
            if gen_tokens:
                m["tokens"].inc(gen_tokens)
            m["progress"].set(min(1.0, (self.done_before + self.rows) / max(self.total, 1)))

    def engine_died(self, replica_id: str, error: str) -> int:
        """A replica's engine died; return how many replica processes lost their engine in this job (the restart
        budget). Keyed by replica process, so the several in-flight batches of one dead engine count once."""
        self.engine_deaths.setdefault(replica_id, error)
        return len(self.engine_deaths)

    def replica_stats(self, replica_id: str, stats: dict) -> None:
        self.replicas[replica_id] = stats

    def snapshot(self) -> dict:
        return {
            "total": self.total,
            "done_before": self.done_before,
            "rows": self.rows,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "error_kinds": dict(self.kinds),
            "elapsed_s": time.time() - self.t0,
            "replicas": dict(self.replicas),
        }


def _make_metrics() -> dict | None:
    """Counters for the Ray dashboard (Prometheus/Grafana); best effort, the job runs without them."""
    try:
        from ray.util.metrics import Counter, Gauge

        return {
            "rows": Counter("glm4_batch_rows_done", description="Rows finished by the glm4 batch job."),
            "errors": Counter("glm4_batch_rows_error", description="Error rows of the glm4 batch job."),
            "tokens": Counter("glm4_batch_generated_tokens", description="Tokens generated by the glm4 batch job."),
            "progress": Gauge("glm4_batch_progress", description="Fraction of input rows done."),
        }
    except Exception:  # metrics agent unavailable (minimal install): console progress only
        return None


def _safe_get(ref, timeout: float = 10.0) -> dict:
    import ray

    try:
        return ray.get(ref, timeout=timeout)
    except Exception as e:  # progress is never a reason to fail the job
        logger.warning("progress tracker unavailable: %s", e)
        return {}


class _ProgressPrinter:
    def __init__(self, tracker, say: Callable[[str], None], interval_s: float):
        self._tracker, self._say, self._interval = tracker, say, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="glm4-batch-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            snap = _safe_get(self._tracker.snapshot.remote(), timeout=max(self._interval, 5.0))
            if snap:
                self._say(format_progress(snap))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def format_progress(s: dict) -> str:
    done = min(s["done_before"] + s["rows"], s["total"])  # a retried batch may be counted twice
    total = max(s["total"], 1)
    el = max(s["elapsed_s"], 1e-9)
    rate = s["rows"] / el
    eta = (s["total"] - done) / rate if rate > 0 else float("nan")
    eta_s = "?" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(max(eta, 0)))
    hit = engine_hit_rate(s.get("replicas", {}))
    return (
        f"[glm4-batch] {done}/{s['total']} rows ({100.0 * done / total:.1f}%) | {rate:.2f} rows/s | "
        f"{s['gen_tokens'] / el:.1f} gen tok/s | errors {s['errors']} | ETA {eta_s}"
        + (f" | prefix-cache hit {hit:.1%}" if hit is not None else "")
    )


def engine_hit_rate(replicas: dict[str, dict]) -> float | None:
    """Pool-wide prefix-cache hit rate (cached / looked-up prompt tokens) from each replica's latest cumulative
    engine counters; covers this run's replicas (a restarted replica's counters start again from zero)."""
    hits = sum(st.get("prefix_cache_hit_tokens", 0) for st in replicas.values())
    queries = sum(st.get("prefix_cache_query_tokens", 0) for st in replicas.values())
    return hits / queries if queries else None


# --- manifest -------------------------------------------------------------------------------------------------------
def _manifest(config, listing, input_ids, out_fs, data_path, id_column, model_info, snap, started, run_elapsed,
              done_before) -> dict[str, Any]:
    files = pio.list_files(out_fs, data_path, ".parquet")
    cols = [id_column, "error", "num_prompt_tokens", "num_generated_tokens", "num_cached_tokens", "finish_reason"]
    out = pio.read_parquet_columns(out_fs, files, cols)
    ids = out[id_column].combine_chunks() if out.num_rows else pa.array([], input_ids.type)
    if ids.type != input_ids.type:
        ids = ids.cast(input_ids.type)
    n_out = len(ids)
    n_unique = len(pc.unique(ids)) if n_out else 0
    missing = int(pc.sum(pc.invert(pc.is_in(input_ids, value_set=ids))).as_py() or 0) if len(input_ids) else 0
    errors = out["error"].to_pylist() if out.num_rows else []
    n_err = sum(e is not None for e in errors)
    from pipeline.stages import error_kind

    kinds: dict[str, int] = {}
    for e in errors:
        if e is not None:
            kinds[error_kind(e)] = kinds.get(error_kind(e), 0) + 1
    prompt_tokens = int(pc.sum(out["num_prompt_tokens"]).as_py() or 0) if out.num_rows else 0
    gen_tokens = int(pc.sum(out["num_generated_tokens"]).as_py() or 0) if out.num_rows else 0
    ran = pc.is_null(out["error"]) if out.num_rows else None
    cached = int(pc.sum(pc.filter(out["num_cached_tokens"], ran)).as_py() or 0) if out.num_rows else 0
    ran_prompt = int(pc.sum(pc.filter(out["num_prompt_tokens"], ran)).as_py() or 0) if out.num_rows else 0
    finish = {}
    for r in (out["finish_reason"].to_pylist() if out.num_rows else []):
        finish[str(r)] = finish.get(str(r), 0) + 1
    rows_in = len(input_ids)
    error_fraction = n_err / rows_in if rows_in else 0.0
    rows_this_run = snap.get("rows", max(n_out - done_before, 0))
    gen_this_run = snap.get("gen_tokens", 0)
    problems = []
    if missing:
        problems.append(f"{missing} input row(s) missing from the output")
    if n_unique != n_out:
        problems.append(f"{n_out - n_unique} duplicate id(s) in the output")
    if error_fraction > config.max_error_fraction:
        problems.append(f"error fraction {error_fraction:.4f} > max_error_fraction {config.max_error_fraction}")
    status = "succeeded" if not problems else "failed"
    exit_code = EXIT_OK
    if problems:
        exit_code = EXIT_TOO_MANY_ERRORS if not (missing or n_unique != n_out) else EXIT_FAILED
    return {
        "status": status,
        "exit_code": exit_code,
        "problems": problems,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "elapsed_s": round(time.time() - started, 3),
        "input": {"uri": redact_uri(config.input),
                  "files": [{"path": f.rel, "rows": f.num_rows, "bytes": f.size} for f in listing.files]},
        "output": {"uri": redact_uri(config.output), "data": redact_uri(config.data_uri), "files": len(files),
                   "id_column": id_column},
        "counts": {
            "rows_in": rows_in,
            "rows_out": n_out,
            "rows_ok": n_out - n_err,
            "rows_error": n_err,
            "error_fraction": round(error_fraction, 6),
            "unique_ids": n_unique,
            "missing_ids": missing,
            "rows_resumed": done_before,
            "rows_this_run": rows_this_run,
            "errors_by_kind": kinds,
            "finish_reasons": finish,
        },
        "tokens": {"prompt": prompt_tokens, "generated": gen_tokens},
        "throughput": {
            "run_elapsed_s": round(run_elapsed, 3),
            "rows_per_s": round(rows_this_run / run_elapsed, 4) if run_elapsed > 0 else None,
            "generated_tokens_per_s": round(gen_this_run / run_elapsed, 3) if run_elapsed > 0 else None,
        },
        "prefix_cache": {
            # Engine counters of this run's replicas; the row counts below also cover resumed rows.
            "hit_rate": engine_hit_rate(snap.get("replicas", {})),
            "rows_cached_prompt_tokens": cached,
            "rows_prompt_tokens": ran_prompt,
            "prefix_aware": config.prefix_aware,
            "replica_engine_stats": snap.get("replicas", {}),
        },
        "config": config.redacted(),
        "model": {"uri": redact_uri(config.model), **model_info},
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("glm4-ray", "ray", "torch", "pyarrow", "s3fs"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _summary(manifest: dict, *, status: str, exit_code: int) -> dict[str, Any]:
    counts = manifest.get("counts", {})
    thr = manifest.get("throughput", {})
    return {
        "status": status,
        "exit_code": exit_code,
        "problems": manifest.get("problems", []),
        "output": manifest.get("output", {}).get("uri"),
        "data": manifest.get("output", {}).get("data"),
        "rows_in": counts.get("rows_in"),
        "rows_ok": counts.get("rows_ok"),
        "rows_error": counts.get("rows_error"),
        "error_fraction": counts.get("error_fraction"),
        "rows_resumed": counts.get("rows_resumed"),
        "errors_by_kind": counts.get("errors_by_kind", {}),
        "prompt_tokens": manifest.get("tokens", {}).get("prompt"),
        "generated_tokens": manifest.get("tokens", {}).get("generated"),
        "elapsed_s": manifest.get("elapsed_s"),
        "rows_per_s": thr.get("rows_per_s"),
        "generated_tokens_per_s": thr.get("generated_tokens_per_s"),
        "prefix_cache_hit_rate": manifest.get("prefix_cache", {}).get("hit_rate"),
    }


def _final_line(s: dict) -> str:
    hit = s.get("prefix_cache_hit_rate")
    return (
        f"[glm4-batch] {s['status']}: {s['rows_ok']} ok, {s['rows_error']} error of {s['rows_in']} rows "
        f"in {s['elapsed_s']:.1f}s ({s['rows_per_s'] or 0:.2f} rows/s, {s['generated_tokens_per_s'] or 0:.1f} "
        f"gen tok/s"
        + (f", prefix-cache hit {hit:.1%}" if hit is not None else "")
        + f"); results in {s['data']}"
        + (f"; problems: {'; '.join(s['problems'])}" if s["problems"] else "")
    )
