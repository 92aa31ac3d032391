"""The output side of a batch job: checkpoint repair before a resume, the manifest (counted from the written files),
and the `_SUCCESS` marker.

Everything here is O(files) on the driver. Row-level work runs in the cluster: per-file statistics in Ray tasks
(one per group of files, read in parallel), the exactly-once check as a Ray Data hash aggregation over the written
ids. The driver only adds up one small dict per file group.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import io as pio
from pipeline.config import BatchJobConfig, redact_uri
from pipeline.progress import count_error_kinds, engine_hit_rate

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_TOO_MANY_ERRORS = 3
PENDING_SUFFIX = ".pending.parquet"
# Files per statistics task: few enough tasks for the driver to collect, enough to read in parallel.
FILES_PER_STATS_TASK = 16
# Rows per hash partition of the exactly-once check.
ROWS_PER_ID_PARTITION = 2_000_000


# --- resume: before the run ----------------------------------------------------------------------------------------
# Outputs whose execution failed in THIS process (output uri -> when). Tasks of a failed execution die with their
# owner only when the driver process exits; in a long-lived process (a service calling run_batch, the tests) a
# Write task of the failed attempt can still finish its data write or checkpoint commit while the rerun's
# checkpoint recovery is deleting "uncommitted" data, losing rows. A rerun in the same process therefore first
# waits for the output to stop changing.
FAILED_RUNS: dict[str, float] = {}
SETTLE_QUIET_S = 10.0
SETTLE_TIMEOUT_S = 180.0


def settle_after_failed_run(config: BatchJobConfig, out_fs, data_path: str, ckpt_fs, ckpt_path: str) -> None:
    if FAILED_RUNS.pop(config.output, None) is None:
        return
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last: list[str] | None = None
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        try:
            for fs in (ckpt_fs, out_fs):
                fs.invalidate_cache()  # s3fs caches listings; we need to see the other attempt's writes
            snapshot = sorted(pio.list_files(ckpt_fs, ckpt_path, ".parquet") + pio.list_files(out_fs, data_path))
        except pio.StorageError:
            snapshot = None  # store still unreachable: keep waiting, recovery would fail anyway
        if snapshot is None or snapshot != last:
            last, quiet_since = snapshot, time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLE_QUIET_S:
            return
        time.sleep(1.0)
    logger.warning("output %s kept changing for %.0fs after the failed run; resuming anyway", config.output,
                   SETTLE_TIMEOUT_S)


def drop_half_committed_markers(fs, ckpt_path: str) -> None:
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


def committed_checkpoint_files(fs, ckpt_path: str) -> list[str]:
    return [p for p in pio.list_files(fs, ckpt_path, ".parquet") if not p.endswith(PENDING_SUFFIX)]


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


# --- statistics of the written files ---------------------------------------------------------------------------------
_STAT_COLUMNS = ["error", "num_prompt_tokens", "num_generated_tokens", "num_cached_tokens", "finish_reason"]


def parquet_file_stats(fs, paths: list[str]) -> dict[str, Any]:
    """Counts of a group of result files (runs in a Ray task, near the data)."""
    acc = empty_stats()
    for p in paths:
        with pio.storage_errors(f"reading result statistics of {p}"):
            with fs.open(p, "rb") as f:
                t = pq.read_table(f, columns=_STAT_COLUMNS)
        if not t.num_rows:
            continue
        ok = pc.is_null(t["error"])
        errors = pc.drop_null(t["error"]).to_pylist()  # error rows only: few, and counted here, not on the driver
        finish = pc.value_counts(pc.fill_null(t["finish_reason"], "None")).to_pylist()
        add_stats(acc, {
            "rows": t.num_rows,
            "errors": len(errors),
            "error_kinds": count_error_kinds(errors),
            "prompt_tokens": _sum(t["num_prompt_tokens"]),
            "generated_tokens": _sum(t["num_generated_tokens"]),
            "ok_cached_tokens": _sum(pc.filter(t["num_cached_tokens"], ok)),
            "ok_prompt_tokens": _sum(pc.filter(t["num_prompt_tokens"], ok)),
            "finish_reasons": {str(v["values"]): int(v["counts"]) for v in finish},
        })
    return acc


def _sum(col) -> int:
    return int(pc.sum(col).as_py() or 0)


def empty_stats() -> dict[str, Any]:
    return {"rows": 0, "errors": 0, "error_kinds": {}, "prompt_tokens": 0, "generated_tokens": 0,
            "ok_cached_tokens": 0, "ok_prompt_tokens": 0, "finish_reasons": {}}


def add_stats(acc: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    for k, v in part.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                acc[k][kk] = acc[k].get(kk, 0) + vv
        else:
            acc[k] += v
    return acc


def over_file_groups(fn, fs, files: list[str], *args) -> list[Any]:
    """`fn(fs, group, *args)` as Ray tasks over groups of FILES_PER_STATS_TASK files; the small results, in order."""
    import ray

    task = ray.remote(num_cpus=0.25, max_retries=3)(fn)
    groups = [files[i:i + FILES_PER_STATS_TASK] for i in range(0, len(files), FILES_PER_STATS_TASK)]
    return ray.get([task.remote(fs, g, *args) for g in groups])


def collect_stats(fs, files: list[str], stats_fn=parquet_file_stats) -> dict[str, Any]:
    """Statistics of all result files: Ray tasks over groups of files, summed on the driver (O(files))."""
    acc = empty_stats()
    for part in over_file_groups(stats_fn, fs, files):
        add_stats(acc, part)
    return acc


def duplicate_ids(fs, files: list[str], id_column: str, rows: int, read_ids, ids_dataset) -> tuple[int, int, list[Any]]:
    """(distinct ids, ids written more than once, a few examples) of the written files, computed in the cluster.

    Up to ROWS_PER_ID_PARTITION rows, one Ray task reads every id and counts (seconds, and no shuffle to set up);
    beyond, a Ray Data hash aggregation over the ids (`ids_dataset`), partitioned by ROWS_PER_ID_PARTITION rows. No
    id reaches the driver either way, except the examples."""
    import ray

    if rows == 0:
        return 0, 0, []
    if rows <= ROWS_PER_ID_PARTITION:
        return ray.get(ray.remote(num_cpus=0.25, max_retries=3)(_count_ids).remote(fs, files, read_ids))
    from ray.data.aggregate import Count

    partitions = -(-rows // ROWS_PER_ID_PARTITION)
    counts = ids_dataset(fs, files, id_column).groupby(id_column, num_partitions=partitions).aggregate(
        Count(alias_name="n")).materialize()
    distinct = counts.count()
    dups = counts.filter(expr="n > 1")
    n_dup = dups.count()
    return distinct, n_dup, [r[id_column] for r in dups.take(5)] if n_dup else []


def null_ids(fs, files: list[str], read_ids) -> int:
    """Null ids over the files: Ray tasks over groups of files, one int each back to the driver."""
    return sum(over_file_groups(_nulls, fs, files, read_ids))


def _nulls(fs, files: list[str], read_ids) -> int:
    return sum(read_ids(fs, p).null_count for p in files)


def _count_ids(fs, files: list[str], read_ids) -> tuple[int, int, list[Any]]:
    ids = pa.chunked_array([read_ids(fs, p) for p in files]).combine_chunks()
    counts = pc.value_counts(ids)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    return len(counts), len(dup), dup.slice(0, 5).to_pylist()


# --- the manifest ------------------------------------------------------------------------------------------------------
def build_manifest(config: BatchJobConfig, *, listing, rows_in: int, stats: dict[str, Any], distinct_ids: int,
                   duplicate_examples: list[Any], n_duplicates: int, files_out: int, id_column: str,
                   model_info: dict[str, Any], snap: dict[str, Any], started: float, run_elapsed: float,
                   done_before: int, replicas: dict[str, Any]) -> dict[str, Any]:
    n_out, n_err = stats["rows"], stats["errors"]
    missing = max(rows_in - distinct_ids, 0)  # every written id comes from the input, so distinct <= rows_in
    error_fraction = n_err / rows_in if rows_in else 0.0
    rows_this_run = snap.get("rows", max(n_out - done_before, 0))
    gen_this_run = snap.get("gen_tokens", 0)
    problems = []
    if missing:
        problems.append(f"{missing} input row(s) missing from the output")
    if n_duplicates:
        problems.append(f"{n_out - distinct_ids} duplicate row(s) over {n_duplicates} id(s) in the output, e.g. "
                        f"{duplicate_examples}")
    if error_fraction > config.max_error_fraction:
        problems.append(f"error fraction {error_fraction:.4f} > max_error_fraction {config.max_error_fraction}")
    exit_code = EXIT_OK
    if problems:
        exit_code = EXIT_FAILED if (missing or n_duplicates) else EXIT_TOO_MANY_ERRORS
    return {
        "status": "succeeded" if not problems else "failed",
        "exit_code": exit_code,
        "problems": problems,
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "elapsed_s": round(time.time() - started, 3),
        "input": {"uri": redact_uri(config.input), "format": listing.format,
                  "files": [{"path": f.rel, "rows": f.num_rows, "bytes": f.size} for f in listing.files]},
        "output": {"uri": redact_uri(config.output), "data": redact_uri(config.data_uri), "files": files_out,
                   "id_column": id_column},
        "counts": {
            "rows_in": rows_in,
            "rows_out": n_out,
            "rows_ok": n_out - n_err,
            "rows_error": n_err,
            "error_fraction": round(error_fraction, 6),
            "unique_ids": distinct_ids,
            "missing_ids": missing,
            "rows_resumed": done_before,
            "rows_this_run": rows_this_run,
            "errors_by_kind": stats["error_kinds"],
            "finish_reasons": stats["finish_reasons"],
        },
        "tokens": {"prompt": stats["prompt_tokens"], "generated": stats["generated_tokens"]},
        "throughput": {
            "run_elapsed_s": round(run_elapsed, 3),
            "rows_per_s": round(rows_this_run / run_elapsed, 4) if run_elapsed > 0 else None,
            "generated_tokens_per_s": round(gen_this_run / run_elapsed, 3) if run_elapsed > 0 else None,
        },
        "engine": {
            # Mean running sequences per engine step / max_num_seqs (every step counted), and the pool's running /
            # max_num_seqs sampled every few seconds.
            "occupancy_mean": snap.get("occupancy_mean"),
            "occupancy_series": snap.get("occupancy_series", []),
        },
        "replicas": replicas,
        "prefix_cache": {
            # Engine counters of this run's replicas; the row counts below also cover resumed rows.
            "hit_rate": engine_hit_rate(snap.get("replicas", {})),
            "rows_cached_prompt_tokens": stats["ok_cached_tokens"],
            "rows_prompt_tokens": stats["ok_prompt_tokens"],
            "prefix_aware": config.prefix_aware,
            "replica_engine_stats": snap.get("replicas", {}),
        },
        "config": config.redacted(),
        "model": {"uri": redact_uri(config.model), **model_info},
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("glm4-ray", "ray", "torch", "pyarrow", "s3fs"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def write_manifest(out_fs, manifest_path: str, manifest: dict[str, Any]) -> None:
    pio.write_text(out_fs, manifest_path, json.dumps(manifest, indent=2, sort_keys=True, default=str))


def summary(manifest: dict, *, status: str, exit_code: int) -> dict[str, Any]:
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
        "engine_occupancy": manifest.get("engine", {}).get("occupancy_mean"),
    }


def final_line(s: dict) -> str:
    hit = s.get("prefix_cache_hit_rate")
    occ = s.get("engine_occupancy")
    return (
        f"[glm4-batch] {s['status']}: {s['rows_ok']} ok, {s['rows_error']} error of {s['rows_in']} rows "
        f"in {s['elapsed_s']:.1f}s ({s['rows_per_s'] or 0:.2f} rows/s, {s['generated_tokens_per_s'] or 0:.1f} "
        f"gen tok/s"
        + (f", engine occupancy {occ:.0%}" if occ is not None else "")
        + (f", prefix-cache hit {hit:.1%}" if hit is not None else "")
        + f"); results in {s['data']}"
        + (f"; problems: {'; '.join(s['problems'])}" if s["problems"] else "")
    )
