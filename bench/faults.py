"""Fault injection on the batch job: prints ONE table with, per scenario, rows in, rows out, rows lost, rows
duplicated, error rows, and whether the job finished or failed cleanly.

    .venv/bin/python bench/faults.py [--seeds 3] [--rows 40] [--only NAME ...] [--serve]

Everything runs locally: a private Ray cluster (address="local", 4 logical CPUs), moto's S3 server as a separate
process behind a TCP proxy that can be "unplugged", the tiny generated checkpoint. Scenarios:

  sigkill-resume/seed=N   the driver (a `glm4-batch` subprocess) is SIGKILLed at a random point mid-job, then rerun
  replica-killed-twice    the engine replica actor is SIGKILLed twice in one job, each time while it is stepping
                          with rows in flight; the job must finish in the same run
  tp-worker-killed        tp=2 replica on CPU (RayExecutor): rank 1's actor is SIGKILLed while the replica is
                          stepping; the replica must be replaced and the job finish in the same run
  s3-down-during-writes   the object store is unreachable for a while during the writes (then rerun if needed)
  finished-output         the output prefix already holds a finished run: a rerun (even with another config) must
                          not touch it; only --overwrite replaces it
  corrupt-input           one input file is garbage / one has a corrupt data page
  model-cache-full        the node-local model cache is a 64 KiB filesystem (ENOSPC)
  model-cache-readonly    the node-local model cache is read-only (EROFS/EACCES)

"lost" = input ids missing from the final output, "dup" = ids present more than once. "clean" means the fault
provably landed (a kill hit a live process working on rows, the outage blocked writes of a running job, the broken
input or cache was reported) and the job either finished with every id exactly once, or stopped with a clear
error, no _SUCCESS and nothing lost that a rerun does not bring back. Every job runs with the default settings
except `FAULT`'s (each one explained there). With --serve, bench/serve_abuse.py's table follows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


# The reliability tests' loader and the pipeline tests' helpers (TcpProxy for a stoppable store, free ports,
# raylet children by title): the same code the CI subset of these scenarios runs.
from tests.reliability.conftest import _load, pipeline_helpers as helpers  # noqa: E402


# --------------------------------------------------------------------------------------------------- results
@dataclass
class Row:
    scenario: str
    rows_in: int = 0
    rows_out: int = 0
    lost: int = 0
    dup: int = 0
    error_rows: int = 0
    outcome: str = ""
    clean: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        return [self.scenario, str(self.rows_in), str(self.rows_out), str(self.lost), str(self.dup),
                str(self.error_rows), self.outcome, "yes" if self.clean else "NO", f"{self.seconds:.0f}",
                "; ".join(self.notes)]


COLUMNS = ["scenario", "rows in", "rows out", "lost", "dup", "error rows", "outcome", "clean", "s", "notes"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def count_output(data_dir: str, id_col: str, expected: list[str], fs=None) -> dict[str, int]:
    import pyarrow.parquet as pq

    ids: list[Any] = []
    errors = 0
    if fs is None:
        files = sorted(Path(data_dir).glob("*.parquet")) if Path(data_dir).is_dir() else []
        tables = [pq.read_table(f, columns=[id_col, "error"]) for f in files]
    else:
        files = [p for p in fs.find(data_dir) if p.endswith(".parquet")] if fs.exists(data_dir) else []
        tables = []
        for p in files:
            with fs.open(p, "rb") as f:
                tables.append(pq.read_table(f, columns=[id_col, "error"]))
    for t in tables:
        ids += t.column(id_col).to_pylist()
        errors += sum(e is not None for e in t.column("error").to_pylist())
    c = Counter(ids)
    return {"rows_out": len(ids), "lost": len(set(expected) - set(c)), "dup": sum(v - 1 for v in c.values() if v > 1),
            "error_rows": errors, "extra": len(set(c) - set(expected))}


def fill(row: Row, counts: dict[str, int]) -> None:
    row.rows_out, row.lost, row.dup, row.error_rows = (counts["rows_out"], counts["lost"], counts["dup"],
                                                        counts["error_rows"])
    if counts.get("extra"):
        row.notes.append(f"{counts['extra']} unexpected ids")


def short(e: BaseException, n: int = 160) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= n else text[:n] + "..."


# --------------------------------------------------------------------------------------------------- environment
class Env:
    """A private Ray cluster, a moto S3 server (separate process) behind a stoppable proxy, the tiny checkpoint."""

    def __init__(self, work: Path):
        import ray

        from glm4.tools.make_checkpoint import make_checkpoint

        self.work = work
        self.model = Path(make_checkpoint(work / "tiny", "tiny", seed=0, num_shards=2, dtype="float32"))
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        self.gcs = ray.get_runtime_context().gcs_address
        self.moto_port = helpers.free_port()
        self.moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                      str(self.moto_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        helpers._wait_port(self.moto_port)
        self.proxy = helpers.TcpProxy(self.moto_port)
        self.proxy.start()
        self.endpoint = f"http://127.0.0.1:{self.proxy.port}"
        self.s3 = helpers.s3fs_client(f"http://127.0.0.1:{self.moto_port}")  # direct: works while "unplugged"
        self._n = 0

    def bucket(self) -> str:
        self._n += 1
        name = f"faults-{os.getpid()}-{self._n}"
        self.s3.mkdir(name)
        return name

    def close(self) -> None:
        import ray

        self.proxy.stop()
        self.moto.terminate()
        try:
            self.moto.wait(10)
        except subprocess.TimeoutExpired:
            self.moto.kill()
        ray.shutdown()


def prompts(n: int, seed: int = 0) -> dict[str, list]:
    rng = random.Random(seed)
    return {"pid": [f"row-{i:04d}" for i in range(n)],
            "prompt": [f"prompt {i} " + "word " * rng.randint(0, 6) for i in range(n)]}


KILL_TOKENS = 32  # tokens per row in the kill scenarios (the workload): long enough that a kill lands mid-job
# Every scenario runs with the settings a user gets by default (prefix_aware on, batches_in_flight derived, one
# replica, default read tasks, ...) except these:
BASE = dict(
    device="cpu",  # no GPU here
    # The cluster has 4 logical CPUs on 2 cores: a fractional replica leaves room for the read, tokenize and write
    # tasks next to it (README: "on small machines give replicas fractional CPUs").
    replica_num_cpus=0.5,
)
# ... and, for the scenarios whose fault must land mid-job (kills, outage), these:
FAULT = dict(
    BASE,
    # Default 32-row engine calls and 2000-row files would hold the input in a couple of calls and one file written
    # at the end: small ones make the output grow file by file, so a fault lands between committed files.
    batch_size=2,
    rows_per_file=2,
    # The tiny model on CPU runs a whole small input in one engine round (every row finishing in the same few
    # steps, seconds): two sequence slots make the job many rounds long. batches_in_flight keeps its default,
    # derived from this (max(2, ceil(2 * 2 / batch_size)) = 2 batches per replica).
    engine={"max_num_seqs": 2},
)
FAULT_CLI = ["--device", "cpu", "--replica-num-cpus", "0.5", "--batch-size", "2", "--rows-per-file", "2",
             "--max-num-seqs", "2"]  # FAULT as glm4-batch flags


def config(env: Env, tmp: Path, base: dict | None = None, **kw):
    """A job config: `base` (default FAULT) + the scenario's own fields; sampling defaults to 12 tokens per row (the
    workload: short rows keep the bench short)."""
    from pipeline.config import BatchJobConfig

    cfg = {**(FAULT if base is None else base), "prompt_column": "prompt", "id_column": "pid",
           "model": str(env.model), "model_cache_dir": str(tmp / "cache"), "sampling": {"max_tokens": 12},
           "ray_address": env.gcs}
    cfg.update(kw)
    return BatchJobConfig(**cfg)


def committed(paths) -> int:
    return sum(1 for p in paths if str(p).endswith(".parquet") and not str(p).endswith(".pending.parquet"))


def rows_committed(ckpt: Path) -> int:
    """Rows of the checkpoint files committed so far in a local output (a local commit is a rename: each committed
    file is complete)."""
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in ckpt.glob("*.parquet") if not p.name.endswith(".pending.parquet"))


def wait_for(cond: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] | None = None) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if alive is not None and not alive():
            return False
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class JobThread:
    """run_batch in a thread of this process (the driver), with its result or exception."""

    def __init__(self, cfg):
        from pipeline.batch import run_batch

        self.result: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, args=(run_batch, cfg), daemon=True)
        self.thread.start()

    def _run(self, run_batch, cfg) -> None:
        try:
            self.result["summary"] = run_batch(cfg, progress=None)
        except BaseException as e:  # noqa: BLE001 - reported
            self.result["error"] = e

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def succeeded(self) -> bool:
        return "summary" in self.result and self.result["summary"]["status"] == "succeeded"


def outcome_of(result: dict[str, Any]) -> str:
    if "summary" in result:
        s = result["summary"]
        return f"{s['status']} (exit {s['exit_code']})"
    if "error" in result:
        return f"failed: {short(result['error'])}"
    return "HUNG"


def session_logs_grep(needle: str, pid: int | None = None) -> list[str]:
    """Files of this Ray session's logs that contain `needle` (only worker process `pid`'s logs if given)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    hits = []
    for p in logs.glob("*"):
        if pid is not None and not p.stem.endswith(f"-{pid}"):  # worker-<worker id>-<job id>-<pid>.err
            continue
        if p.is_file() and p.suffix in (".err", ".out", ".log"):
            try:
                if needle.encode() in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                pass
    return hits


def pids_with_title(prefix: str) -> list[int]:
    return helpers.raylet_children_with_title(prefix)


def replica_engine_stats(out: Path) -> dict[str, dict]:
    """The manifest's per-replica engine stats ("node:pid" -> latest stats), {} without a manifest."""
    try:
        return json.loads((out / "manifest.json").read_text())["prefix_cache"]["replica_engine_stats"]
    except (OSError, KeyError, ValueError):
        return {}


def generated_by(stats: dict[str, dict], pid: int) -> int:
    return (helpers.JobWatch.stats_of(stats, pid) or {}).get("num_generated_tokens", 0)


# --------------------------------------------------------------------------------------------------- scenarios
def sigkill_resume(env: Env, n: int, seed: int) -> Row:
    """The driver process is SIGKILLed at a random point mid-job (after a random number of committed files plus a
    random delay, while it still runs and rows are left), then the same command is run again."""
    row = Row(f"sigkill-resume/seed={seed}", rows_in=n)
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f"sigkill{seed}-", dir=env.work))
    helpers.write_prompts(tmp / "in.parquet", prompts(n, seed))
    out = tmp / "out"
    argv = [sys.executable, "-m", "jobs.batch", "--model", str(env.model), "--input", str(tmp / "in.parquet"),
            "--output", str(out), "--prompt-column", "prompt", "--id-column", "pid", "--max-tokens", str(KILL_TOKENS),
            *FAULT_CLI, "--model-cache-dir", str(tmp / "cache"), "--ray-address", env.gcs, "--summary-json"]
    t0 = time.time()
    with open(tmp / "first-run.log", "w") as log:  # a file, not a pipe nobody reads while the job runs
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    k = rng.randint(1, max(1, n // 6))  # of n/2 files: the kill lands in the first two thirds of the job
    delay = rng.uniform(0.0, 1.0)
    replicas: list[int] = []
    try:
        reached = wait_for(lambda: committed((out / "_checkpoint").glob("*")) >= k, 300, f"{k} committed files",
                           alive=lambda: proc.poll() is None)
        if reached:
            time.sleep(delay)
        replicas = helpers.engine_actor_pids()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = proc.returncode == -signal.SIGKILL
    done_at_kill = rows_committed(out / "_checkpoint")
    finished_first = (out / "_SUCCESS").exists()
    # The fault landed mid-job: the driver was killed (not already gone), rows were committed and rows were left.
    mid_job = killed and not finished_first and 0 < done_at_kill < n
    row.notes.append(f"killed after >={k} files +{delay:.1f}s: {done_at_kill} rows committed, "
                     f"{len(replicas)} engine replica(s) alive" + ("" if mid_job else " (NOT mid-job)"))
    rerun = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    summary = json.loads(rerun.stdout.strip().splitlines()[-1]) if rerun.returncode == 0 else {}
    fill(row, count_output(str(out / "data"), "pid", prompts(n, seed)["pid"]))
    row.outcome = (f"rerun {summary.get('status')} (resumed {summary.get('rows_resumed')})" if summary
                   else f"rerun exit {rerun.returncode}: {rerun.stderr.strip()[-160:]}")
    row.clean = mid_job and rerun.returncode == 0 and row.lost == 0 and row.dup == 0 and (out / "_SUCCESS").exists()
    row.seconds = time.time() - t0
    return row


def replica_killed_twice(env: Env, n: int) -> Row:
    """The replica actor is SIGKILLed twice in one job, each time while its engine is stepping with rows in flight.
    Clean only if both kills landed (two distinct live replica processes, each working on rows), a process started
    after the second kill generated the rest, and the job finished in the same run with every id once."""
    row = Row("replica-killed-twice", rows_in=n)
    tmp = Path(tempfile.mkdtemp(prefix="replica-", dir=env.work))
    helpers.write_prompts(tmp / "in.parquet", prompts(n))
    out = tmp / "out"
    cfg = config(env, tmp, input=str(tmp / "in.parquet"), output=str(out), sampling={"max_tokens": KILL_TOKENS})
    t0 = time.time()
    killed: list[tuple[int, dict, int]] = []  # (pid, its stats just before the kill, rows committed at the kill)
    with helpers.JobWatch() as watch:
        job = JobThread(cfg)
        alive = job.thread.is_alive
        last_kill = 0.0
        try:
            for i in range(2):
                wait_for(lambda: [p for p in watch.live("replica") if p not in {k[0] for k in killed}], 300,
                         f"a live replica for kill #{i + 1}", alive=alive)
                victims = [p for p in watch.live("replica") if p not in {k[0] for k in killed}]
                if not victims or not alive():
                    row.notes.append(f"job ended before kill #{i + 1}")
                    break
                busy = watch.wait_busy(victims[0], 120, alive=alive)
                os.kill(victims[0], signal.SIGKILL)
                last_kill = time.time()
                killed.append((victims[0], busy, rows_committed(out / "_checkpoint")))
                helpers.wait_gone(victims[0])
        except (AssertionError, TimeoutError) as e:
            row.notes.append(f"kill #{len(killed) + 1} did not happen: {e}")
        done = job.join(600)
        after = [p for p in watch.pids("replica", since=last_kill) if p not in {k[0] for k in killed}] \
            if len(killed) == 2 else []
    stats = replica_engine_stats(out)
    for pid, busy, rows in killed:
        row.notes.append(f"killed {pid}: {busy['num_streams']} rows in flight, {rows}/{n} rows committed")
    worked_after = [p for p in after if generated_by(stats, p) > 0]
    row.notes.append(f"after kill #2: replica(s) {after}, {sum(generated_by(stats, p) for p in after)} tokens "
                     "generated by them")
    both_landed = (len(killed) == 2 and killed[0][0] != killed[1][0]
                   and all(b["num_streams"] > 0 and r < n for _, b, r in killed)
                   and all(helpers.JobWatch.stats_of(stats, p) is not None for p, _, _ in killed))
    fill(row, count_output(str(out / "data"), "pid", prompts(n)["pid"]))
    row.outcome = outcome_of(job.result) if done else "HUNG"
    row.clean = bool(done and job.succeeded() and both_landed and worked_after and row.lost == 0 and row.dup == 0)
    row.seconds = time.time() - t0
    return row


def tp_worker_killed(env: Env, n: int) -> Row:
    """tp=2 on CPU through pipeline.tp_ray.RayExecutor. Rank 1's actor is SIGKILLed while the replica's engine is
    stepping with rows in flight: the engine raises TensorParallelError, the replica exits (one of the job's
    max_engine_restarts, default 3) and Ray Data replaces it, with a new rank-1 actor, in the same run. Clean only
    if all of that is observed and the first run finishes with every id once; a rerun only fills the table."""
    row = Row("tp-worker-killed", rows_in=n)
    tmp = Path(tempfile.mkdtemp(prefix="tp-", dir=env.work))
    helpers.write_prompts(tmp / "in.parquet", prompts(n))
    out = tmp / "out"
    cfg = config(env, tmp, input=str(tmp / "in.parquet"), output=str(out), tensor_parallel_size=2,
                 sampling={"max_tokens": KILL_TOKENS})
    t0 = time.time()
    ev: dict[str, Any] = {}
    with helpers.JobWatch() as watch:
        job = JobThread(cfg)
        alive = job.thread.is_alive
        try:
            wait_for(lambda: watch.live("tp_rank") and watch.live("replica"), 300, "a TP worker and its replica",
                     alive=alive)
            ranks, replicas = watch.live("tp_rank"), watch.live("replica")
            if len(ranks) != 1 or len(replicas) != 1:
                raise AssertionError(f"expected one replica and one rank-1 actor, found {replicas} and {ranks}")
            ev["busy"] = watch.wait_busy(replicas[0], 120, alive=alive)
            os.kill(ranks[0], signal.SIGKILL)
            ev.update(rank=ranks[0], replica=replicas[0], at=time.time(),
                      rows_at_kill=rows_committed(out / "_checkpoint"))
            row.notes.append(f"rank-1 actor {ranks[0]} SIGKILLed while replica {replicas[0]} had "
                             f"{ev['busy']['num_streams']} rows in flight, {ev['rows_at_kill']}/{n} rows committed")
            helpers.wait_gone(ranks[0])
            # The replica's engine dies with its peer and the replica process exits to be replaced.
            wait_for(lambda: not helpers.pid_alive(replicas[0]), 120, "the replica to exit", alive=alive)
            ev["replica_exited"] = not helpers.pid_alive(replicas[0])
        except (AssertionError, TimeoutError) as e:
            row.notes.append(str(e))
        done = job.join(400)
        if "at" in ev:
            ev["new_ranks"] = watch.pids("tp_rank", since=ev["at"])
            ev["new_replicas"] = [p for p in watch.pids("replica", since=ev["at"]) if p != ev["replica"]]
    first = outcome_of(job.result) if done else "HUNG"
    same_run = bool(done and job.succeeded())
    first_counts = count_output(str(out / "data"), "pid", prompts(n)["pid"])
    stats = replica_engine_stats(out)
    # In the killed group's replica's own log: the engine raised it there.
    tpe = session_logs_grep("TensorParallelError: tensor-parallel group", ev["replica"]) if "replica" in ev else []
    row.tp_error_logged = bool(tpe)  # type: ignore[attr-defined]
    row.replicas = len(stats)  # type: ignore[attr-defined]
    worked_after = [p for p in ev.get("new_replicas", []) if generated_by(stats, p) > 0]
    row.notes.append(f"first run: {first}, {first_counts['rows_out']} rows; TensorParallelError in replica logs: "
                     f"{'yes' if tpe else 'no'}; new rank-1 actor(s) {ev.get('new_ranks', [])}, new replica(s) "
                     f"{ev.get('new_replicas', [])} ({sum(generated_by(stats, p) for p in worked_after)} tokens)")
    landed = bool("at" in ev and ev["busy"]["num_streams"] > 0 and ev["rows_at_kill"] < n
                  and ev.get("replica_exited") and ev.get("new_ranks") and worked_after and tpe)
    row.landed = landed  # type: ignore[attr-defined]
    row.same_run = same_run  # type: ignore[attr-defined]
    if same_run:
        row.outcome = f"recovered in the same run: {first}"
    else:
        rerun = JobThread(cfg)
        rdone = rerun.join(400)
        row.outcome = (f"NOT recovered in the same run ({first}); rerun "
                       f"{outcome_of(rerun.result) if rdone else 'HUNG'}")
    fill(row, count_output(str(out / "data"), "pid", prompts(n)["pid"]))
    row.clean = bool(same_run and landed and row.lost == 0 and row.dup == 0 and first_counts["dup"] == 0)
    row.seconds = time.time() - t0
    return row


def s3_down_during_writes(env: Env, n: int, down_s: float) -> Row:
    """The store becomes unreachable for `down_s` seconds while the job is writing. Clean if the outage hit a
    running job mid-write (files committed before, none while the store was down) and the job either failed with a
    StorageError saying the store was unreachable, then a rerun completed, or rode through it."""
    row = Row(f"s3-down-{down_s:.0f}s-during-writes", rows_in=n)
    b = env.bucket()
    helpers.write_prompts(f"{b}/in/p.parquet", prompts(n), fs=env.s3)
    tmp = Path(tempfile.mkdtemp(prefix="s3down-", dir=env.work))
    # Short S3 timeouts (defaults: 10 s connect, 60 s read): the job notices the outage within it.
    cfg = config(env, tmp, input=f"s3://{b}/in/", output=f"s3://{b}/out",
                 storage={"endpoint_url": env.endpoint, "connect_timeout_s": 2, "read_timeout_s": 10,
                          "max_attempts": 3})
    ckpt = f"{b}/out/_checkpoint"
    t0 = time.time()
    job = JobThread(cfg)
    ev: dict[str, Any] = {}
    try:
        wait_for(lambda: committed(env.s3.find(ckpt)) >= 2, 300, "2 committed files", alive=job.thread.is_alive)
        env.proxy.stop()
        ev["running"] = job.thread.is_alive()
        time.sleep(1.0)  # a request that reached the store before the cut completes there
        ev["before"] = committed(env.s3.find(ckpt))  # env.s3 talks to moto directly, not through the proxy
        time.sleep(max(0.0, down_s - 1.0))
        ev["during"] = committed(env.s3.find(ckpt)) - ev["before"]
    finally:
        env.proxy.stop()
        env.proxy.start()
    done = job.join(400)
    first = outcome_of(job.result) if done else "HUNG"
    row.notes.append(f"first run: {first}")
    err = job.result.get("error")
    unreachable = ("Could not connect to the endpoint URL", "Connection refused", "Cannot connect to host",
                   "ConnectTimeoutError", "EndpointConnectionError", "ReadTimeoutError")
    observed = err is not None and type(err).__name__ == "StorageError" and any(u in str(err) for u in unreachable)
    landed = bool(ev.get("running") and 2 <= ev.get("before", 0) < n // 2 and ev.get("during") == 0)
    row.notes.append(f"outage after {ev.get('before')} committed files, {ev.get('during')} committed while down"
                     + ("" if landed else " (NOT mid-write)"))
    ok = done and job.succeeded()
    clean_fail = done and observed and not env.s3.exists(f"{b}/out/_SUCCESS")
    if not ok:
        rerun = JobThread(cfg)
        rdone = rerun.join(400)
        ok = rdone and rerun.succeeded()
        row.outcome = ("failed cleanly (StorageError: store unreachable), rerun " if clean_fail
                       else "first run NOT clean, rerun ") + (outcome_of(rerun.result) if rdone else "HUNG")
    else:
        row.outcome = f"rode through the outage: {first}"
    fill(row, count_output(f"{b}/out/data", "pid", prompts(n)["pid"], fs=env.s3))
    row.clean = bool(ok and landed and (clean_fail or "rode" in row.outcome) and row.lost == 0 and row.dup == 0)
    row.seconds = time.time() - t0
    return row


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


def finished_output(env: Env, n: int) -> Row:
    row = Row("finished-output-rerun", rows_in=n)
    from pipeline.batch import run_batch
    from pipeline.io import InputError

    tmp = Path(tempfile.mkdtemp(prefix="finished-", dir=env.work))
    helpers.write_prompts(tmp / "in.parquet", prompts(n))
    out = tmp / "out"
    t0 = time.time()
    # No fault mid-job here: the defaults, bar BASE (the whole input in one engine call and one file).
    cfg = config(env, tmp, BASE, input=str(tmp / "in.parquet"), output=str(out), sampling={"max_tokens": 4})
    first = run_batch(cfg, progress=None)
    before = _snapshot(out)
    checks = []
    again = run_batch(cfg, progress=None)
    checks.append(("same config", again["status"] == "skipped" and _snapshot(out) == before))
    other = config(env, tmp, BASE, input=str(tmp / "in.parquet"), output=str(out),
                   sampling={"max_tokens": 6, "temperature": 0.5})
    res = run_batch(other, progress=None)
    checks.append(("other config", res["status"] == "skipped" and _snapshot(out) == before))
    # data without a checkpoint (e.g. another job's results): refused, nothing touched
    stray = tmp / "stray"
    (stray / "data").mkdir(parents=True)
    (stray / "data" / "x.parquet").write_bytes((next((out / "data").glob("*.parquet"))).read_bytes())
    snap_stray = _snapshot(stray)
    try:
        run_batch(config(env, tmp, BASE, input=str(tmp / "in.parquet"), output=str(stray)), progress=None)
        checks.append(("foreign data", False))
    except InputError:
        checks.append(("foreign data refused", _snapshot(stray) == snap_stray))
    ow = run_batch(config(env, tmp, BASE, input=str(tmp / "in.parquet"), output=str(out), sampling={"max_tokens": 4},
                          overwrite=True), progress=None)
    checks.append(("--overwrite rewrites", ow["status"] == "succeeded" and _snapshot(out) != before))
    fill(row, count_output(str(out / "data"), "pid", prompts(n)["pid"]))
    row.outcome = f"first {first['status']}; reruns: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks)
    row.clean = first["status"] == "succeeded" and all(v for _, v in checks) and row.lost == 0 and row.dup == 0
    row.seconds = time.time() - t0
    return row


def corrupt_input(env: Env, n: int, kind: str) -> Row:
    """kind="garbage": one of two input files is not Parquet at all; kind="bad-page": its footer is intact but a
    data page is corrupted. Either the job stops with an error naming the file (no _SUCCESS, nothing written that a
    fixed rerun would duplicate) or it finishes; never silently drops rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.batch import run_batch

    row = Row(f"corrupt-input/{kind}", rows_in=n)
    tmp = Path(tempfile.mkdtemp(prefix="corrupt-", dir=env.work))
    p = prompts(n)
    half = n // 2
    helpers.write_prompts(tmp / "in" / "a.parquet", {k: v[:half] for k, v in p.items()})
    bad = tmp / "in" / "b.parquet"
    if kind == "garbage":
        bad.write_bytes(b"this is not a parquet file" * 10)
    else:
        pq.write_table(pa.table({k: v[half:] for k, v in p.items()}), bad, compression="NONE",
                       use_dictionary=False)
        data = bytearray(bad.read_bytes())
        start = 4 + 16  # past the magic and into the first page header / data
        for i in range(start, start + 40):
            data[i] ^= 0xFF
        bad.write_bytes(bytes(data))
    out = tmp / "out"
    t0 = time.time()
    job = JobThread(config(env, tmp, BASE, input=str(tmp / "in"), output=str(out)))
    done = job.join(300)
    fill(row, count_output(str(out / "data"), "pid", p["pid"]))
    row.outcome = outcome_of(job.result) if done else "HUNG"
    err = job.result.get("error")
    names_file = err is not None and "b.parquet" in str(err)
    if err is not None:
        row.notes.append("error names the file" if names_file else "error does NOT name the file")
        row.notes.append(f"type {type(err).__module__}.{type(err).__name__}")
    no_success = not (out / "_SUCCESS").exists()
    row.clean = bool(done and ((err is not None and names_file and no_success)
                               or ("summary" in job.result and row.lost == 0 and row.dup == 0)))
    row.lost = row.lost if "summary" in job.result else row.lost  # a stopped job: lost = not yet written
    row.seconds = time.time() - t0
    return row


def _try_mount(path: Path, opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def model_cache_broken(env: Env, n: int, kind: str) -> Row:
    """The model comes from s3:// and the node-local cache cannot take it: a 64 KiB filesystem (disk full) or a
    read-only one. The job must stop within bounded time with an error that says what happened, no _SUCCESS."""
    row = Row(f"model-cache-{kind}", rows_in=n)
    b = env.bucket()
    for f in env.model.iterdir():
        if f.is_file():
            env.s3.pipe(f"{b}/model/{f.name}", f.read_bytes())
    tmp = Path(tempfile.mkdtemp(prefix=f"cache-{kind}-", dir=env.work))
    helpers.write_prompts(tmp / "in.parquet", prompts(n))
    cache = tmp / "cache"
    mounted = _try_mount(cache, "size=64k" if kind == "full" else "ro,size=1m")
    if not mounted:  # no mount permission: a cache path under a regular file fails the same way (ENOTDIR)
        cache.rmdir()
        cache.write_text("not a directory")
        cache = cache / "models"
        row.notes.append("no mount permission: cache under a regular file instead")
    t0 = time.time()
    try:
        job = JobThread(config(env, tmp, BASE, input=str(tmp / "in.parquet"), output=str(tmp / "out"),
                               model=f"s3://{b}/model", model_cache_dir=str(cache),
                               storage={"endpoint_url": env.endpoint}))
        done = job.join(240)
        row.outcome = outcome_of(job.result) if done else "HUNG (>240 s)"
        err = job.result.get("error")
        if err is not None:
            text = str(err)
            clear = any(s in text for s in ("No space left", "Read-only", "Permission denied", "Not a directory",
                                            "ENOSPC", "EROFS", "EACCES", "Errno"))
            row.notes.append("error says why" if clear else "error does NOT say why")
            row.notes.append(f"type {type(err).__name__}")
            row.error_text = text  # type: ignore[attr-defined]
        else:
            clear = False
        fill(row, count_output(str(tmp / "out" / "data"), "pid", prompts(n)["pid"]))
        # The model cannot be stored, so a job that finished never met the fault: only the explained failure is
        # clean.
        row.clean = bool(done and err is not None and clear and not (tmp / "out" / "_SUCCESS").exists())
        leftovers = [p.name for p in cache.iterdir()] if cache.is_dir() else []
        if any(".tmp-" in x for x in leftovers):
            row.notes.append(f"temporary download left in the cache: {leftovers}")
    finally:
        if mounted:
            _umount(tmp / "cache")
    row.seconds = time.time() - t0
    return row


# --------------------------------------------------------------------------------------------------- main
def run_scenarios(env: Env, names: list[str] | None, seeds: int, n: int) -> list[Row]:
    plan: list[tuple[str, Callable[[], Row]]] = []
    for s in range(seeds):
        plan.append((f"sigkill-resume/seed={s}", lambda s=s: sigkill_resume(env, n, seed=s)))
    plan += [
        ("replica-killed-twice", lambda: replica_killed_twice(env, 4 * n)),
        ("tp-worker-killed", lambda: tp_worker_killed(env, 4 * n)),
        ("s3-down-during-writes", lambda: s3_down_during_writes(env, n, down_s=20)),
        ("finished-output-rerun", lambda: finished_output(env, n)),
        ("corrupt-input/garbage", lambda: corrupt_input(env, n, "garbage")),
        ("corrupt-input/bad-page", lambda: corrupt_input(env, n, "bad-page")),
        ("model-cache-full", lambda: model_cache_broken(env, 8, "full")),
        ("model-cache-readonly", lambda: model_cache_broken(env, 8, "readonly")),
    ]
    rows = []
    for name, fn in plan:
        if names and not any(name.startswith(x) for x in names):
            continue
        t0 = time.time()
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001 - a broken scenario is a row, not the end of the bench
            traceback.print_exc()
            r = Row(name, outcome=f"BENCH ERROR {short(e)}", seconds=time.time() - t0)
        print("  " + " | ".join(r.cells()), flush=True)
        rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="driver-SIGKILL repetitions (different random points)")
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--only", nargs="*", help="scenario name prefixes to run")
    ap.add_argument("--serve", action="store_true", help="also run bench/serve_abuse.py's sections")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="glm4-faults-"))
    env = Env(work)
    try:
        rows = run_scenarios(env, args.only, args.seeds, args.rows)
    finally:
        env.close()
    print()
    print(table(rows))
    rc = 0 if all(r.clean for r in rows) else 1
    if args.serve:
        serve_abuse = _load("_glm4_serve_abuse", REPO / "bench" / "serve_abuse.py")
        rc |= serve_abuse.main([])
    return rc


if __name__ == "__main__":
    sys.exit(main())
