"""Faults during a batch job: the driver killed with SIGKILL, an engine replica killed, the object store going
away, a half-committed checkpoint. Every job runs with the settings a user gets by default (`FAULT` lists the few
that are not, and why). Each test first proves that its fault landed on a job that was working (rows in flight,
output partly written), then that the final output holds every input id exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.batch import run_batch
from pipeline.config import BatchJobConfig
from pipeline.io import StorageError

from .conftest import JobWatch, wait_gone, write_prompts
from .test_batch_e2e import assert_exactly_once, read_output

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
# Non-default settings, each needed for a fault to land mid-job on a 2-core CI box; everything else is the default
# (prefix_aware on, batches_in_flight derived, one replica, read_rows_per_task, ...).
FAULT = dict(
    device="cpu",  # CI has no GPU
    # The session's cluster has 4 logical CPUs on 2 cores: a fractional replica leaves room for the read,
    # tokenize and write tasks next to it (README: "on small machines give replicas fractional CPUs").
    replica_num_cpus=0.5,
    # Default 32-row engine calls and 2000-row files would hold a 40-row input in two calls and one file written at
    # the end: small ones make the output grow file by file, so a fault lands between committed files.
    batch_size=2,
    rows_per_file=2,
    # The tiny model on CPU runs a whole 40-row input in one engine round (~3 s, every row finishing in the same
    # few steps), leaving no middle to fault. Two sequence slots make it ~20 rounds; batches_in_flight keeps its
    # default, derived from this (2 batches per replica).
    engine={"max_num_seqs": 2},
    sampling={"max_tokens": 24},  # the workload, not a setting: short rows keep the test short
)
FAULT_CLI = ["--device", "cpu", "--replica-num-cpus", "0.5", "--batch-size", "2", "--rows-per-file", "2",
             "--max-num-seqs", "2", "--max-tokens", "24"]  # FAULT as flags
DERIVED_BATCHES_IN_FLIGHT = 2  # max(2, ceil(2 * max_num_seqs / batch_size))
# How botocore / aiohttp / the OS say that an endpoint cannot be reached.
UNREACHABLE = ("Could not connect to the endpoint URL", "Connection refused", "Cannot connect to host",
               "ConnectTimeoutError", "EndpointConnectionError", "ReadTimeoutError")


def fault_config(tmp_path, **kw) -> BatchJobConfig:
    return BatchJobConfig(**{**FAULT, "model_cache_dir": str(tmp_path / "cache"), **kw})


def _committed(paths) -> list[str]:
    return [str(p) for p in paths if str(p).endswith(".parquet") and not str(p).endswith(".pending.parquet")]


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, job=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {what}")
        if job is not None and not job.is_alive():
            raise AssertionError(f"job ended before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _prompts(n: int) -> dict:
    return {"pid": [f"row-{i:03d}" for i in range(n)], "prompt": [f"prompt {i} " * (1 + i % 3) for i in range(n)]}


def _rows_committed(ckpt: Path) -> int:
    """Rows of the checkpoint files committed so far (each one is complete: a local commit is a rename)."""
    return sum(pq.read_metadata(p).num_rows for p in _committed(ckpt.glob("*")))


def assert_ran_with_defaults(manifest: dict) -> None:
    """The run used the defaults the tests claim: prefix-aware order, derived batches in flight."""
    assert manifest["config"]["prefix_aware"] is True
    assert manifest["config"]["batches_in_flight"] is None
    assert manifest["replicas"]["batches_in_flight"] == DERIVED_BATCHES_IN_FLIGHT, manifest["replicas"]


class _Job:
    """run_batch in a thread of this process, with its summary or exception."""

    def __init__(self, cfg):
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, args=(cfg,), daemon=True)
        self.thread.start()

    def _run(self, cfg) -> None:
        try:
            self.result["summary"] = run_batch(cfg, progress=None)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            self.result["error"] = e

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the job hung (still running after {timeout}s)"


def test_driver_sigkill_then_rerun_resumes_exactly_once(ray_cluster, model_dir, tmp_path):
    n = 40
    write_prompts(tmp_path / "in.parquet", _prompts(n))
    out, ckpt = tmp_path / "out", tmp_path / "out" / "_checkpoint"
    argv = [sys.executable, "-m", "jobs.batch", "--model", str(model_dir), "--input", str(tmp_path / "in.parquet"),
            "--output", str(out), "--prompt-column", "prompt", "--id-column", "pid", *FAULT_CLI,
            "--model-cache-dir", str(tmp_path / "cache"), "--ray-address", ray_cluster, "--summary-json"]
    with JobWatch() as watch, open(tmp_path / "first-run.log", "w") as log:  # a file: nobody reads a pipe meanwhile
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(lambda: len(_committed(ckpt.glob("*"))) >= 2, 240, "two committed files", proc)
            replicas = watch.live("replica")  # the job's engine replica, working on the rows still to do
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the driver finished before it could be killed"
    assert not (out / "_SUCCESS").exists(), "the job finished before it could be interrupted"
    done = _rows_committed(ckpt)
    print(f"driver killed with {done} of {n} rows committed, engine replica(s) {replicas} alive")
    assert 0 < done < n, f"{done} of {n} rows committed at the kill: not mid-job"
    assert len(replicas) == 1, f"expected the job's one engine replica alive at the kill, found {replicas}"
    wait_gone(replicas[0], 60)  # the driver's death ended its job: Ray kills a dead driver's actors

    # The same command again resumes and completes.
    rerun = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and 2 <= summary["rows_resumed"] < n, summary
    assert_exactly_once(read_output(str(out / "data")), "pid", _prompts(n)["pid"])
    assert (out / "_SUCCESS").exists()
    assert_ran_with_defaults(json.loads((out / "manifest.json").read_text()))


def test_killed_replica_is_replaced_without_loss_or_duplicates(ray_cluster, model_dir, tmp_path):
    n = 60  # runway: on a loaded CI machine 40 rows could finish before two stats reports showed the replica busy
    write_prompts(tmp_path / "in.parquet", _prompts(n))
    cfg = fault_config(tmp_path, input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"),
                       model=str(model_dir), prompt_column="prompt", id_column="pid")
    data = tmp_path / "out" / "data"
    with JobWatch() as watch:
        job = _Job(cfg)
        _wait_for(lambda: watch.live("replica"), 240, "the replica to start", job=job)
        victims = watch.live("replica")
        assert len(victims) == 1, victims
        busy = watch.wait_busy(victims[0], 60, alive=job.is_alive)
        os.kill(victims[0], signal.SIGKILL)
        killed_at = time.time()
        rows_at_kill = _rows_committed(tmp_path / "out" / "_checkpoint")
        wait_gone(victims[0])
        job.join(300)
        replacements = [p for p in watch.pids("replica", since=killed_at) if p != victims[0]]
    print(f"killed replica {victims[0]} with {busy['num_streams']} rows in flight at step {busy['num_steps']}, "
          f"{rows_at_kill} of {n} rows committed; replica processes started after the kill: {replacements}")
    summary = job.result.get("summary")
    assert summary is not None and summary["status"] == "succeeded", job.result
    assert_exactly_once(read_output(str(data)), "pid", _prompts(n)["pid"])

    # The fault landed: the victim was this job's engine, stepping with rows in flight, and the output was partial.
    assert busy["num_streams"] > 0 and rows_at_kill < n, (busy, rows_at_kill)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    engines = manifest["prefix_cache"]["replica_engine_stats"]
    assert JobWatch.stats_of(engines, victims[0]) is not None, engines.keys()
    # A replacement process started after the kill and generated the rest.
    assert replacements, "no replica process started after the kill"
    done_by = {p: (JobWatch.stats_of(engines, p) or {}).get("num_generated_tokens", 0) for p in replacements}
    assert any(v > 0 for v in done_by.values()), (done_by, engines.keys())
    assert_ran_with_defaults(manifest)


def test_object_store_outage_fails_cleanly_and_rerun_completes(ray_cluster, model_dir, tmp_path, moto_s3, s3,
                                                               s3_endpoint, bucket):
    proxy, _ = moto_s3
    n = 40
    write_prompts(f"{bucket}/in/prompts.parquet", _prompts(n), fs=s3)
    # Short S3 timeouts and few attempts: the job gives up on the unreachable store within the test's time (the
    # defaults wait 10 s + 60 s per attempt, 3 attempts per request).
    cfg = fault_config(tmp_path, input=f"s3://{bucket}/in/", output=f"s3://{bucket}/out", model=str(model_dir),
                       prompt_column="prompt", id_column="pid",
                       storage={"endpoint_url": s3_endpoint, "connect_timeout_s": 2, "read_timeout_s": 10,
                                "max_attempts": 2})
    ckpt = f"{bucket}/out/_checkpoint"
    job = _Job(cfg)
    try:
        _wait_for(lambda: len(_committed(s3.find(ckpt))) >= 2, 240, "committed files", job=job)
        proxy.stop()
        job_was_running = job.is_alive()
        time.sleep(1.0)  # a request that reached the store before the cut completes there
        committed_at_outage = _committed(s3.find(ckpt))  # s3 talks to moto directly, not through the proxy
        t0 = time.time()
        job.join(240)
        failed_after = time.time() - t0
        committed_after = _committed(s3.find(ckpt))
    finally:
        proxy.stop()
        proxy.start()
    print(f"outage after {len(committed_at_outage)} committed file(s), job running: {job_was_running}; it ended "
          f"{failed_after:.0f}s later: {str(job.result)[:400]}")
    assert job_was_running, "the job finished before the outage"
    assert len(committed_at_outage) < n // 2, "every file was already committed: the outage came too late"
    err = job.result.get("error")
    assert isinstance(err, StorageError), f"expected a StorageError, got {job.result}"
    assert "storage failed during the run" in str(err) and "rerun the same job to resume" in str(err), str(err)
    # ... and the job saw the store unreachable (not some other storage problem).
    assert any(s in str(err) for s in UNREACHABLE), str(err)
    # The job needed the store and could not reach it: nothing was committed while it was down.
    assert committed_after == committed_at_outage, (committed_at_outage, committed_after)
    assert failed_after < 200
    assert not s3.exists(f"{bucket}/out/_SUCCESS")

    summary = run_batch(cfg, progress=None)
    assert summary["status"] == "succeeded" and 2 <= summary["rows_resumed"] < n, summary
    assert_exactly_once(read_output(f"{bucket}/out/data", s3), "pid", _prompts(n)["pid"])
    assert s3.exists(f"{bucket}/out/_SUCCESS")


def test_half_committed_checkpoint_keeps_its_rows(ray_cluster, model_dir, tmp_path):
    """Regression: an outage between the copy and the delete of the checkpoint commit (a rename on object storage)
    leaves X.pending.parquet next to X.parquet. Ray's recovery alone would delete X's data file but keep X's ids
    as done, losing those rows for good."""
    n = 12
    write_prompts(tmp_path / "in.parquet", _prompts(n))
    out = tmp_path / "out"
    # No fault mid-job here: the defaults, bar what gives several committed files (4-row engine calls and files).
    cfg = BatchJobConfig(input=str(tmp_path / "in.parquet"), output=str(out), model=str(model_dir),
                         prompt_column="prompt", id_column="pid", keep_checkpoint=True, device="cpu",
                         replica_num_cpus=0.5, batch_size=4, rows_per_file=4, sampling={"max_tokens": 4},
                         model_cache_dir=str(tmp_path / "cache"))
    assert run_batch(cfg, progress=None)["status"] == "succeeded"
    (out / "_SUCCESS").unlink()  # as if the driver died right after the write
    committed = sorted(p for p in (out / "_checkpoint").glob("*.parquet"))
    assert len(committed) >= 2
    victim = committed[0]
    pending = victim.parent / (victim.name[: -len(".parquet")] + ".pending.parquet")
    pending.write_bytes(victim.read_bytes())
    summary = run_batch(cfg, progress=None)
    assert summary["status"] == "succeeded", summary
    # The half-committed file's rows count as done (resumed, not redone and not lost) and the marker is gone.
    assert summary["rows_resumed"] == n, summary
    assert not pending.exists()
    assert_exactly_once(read_output(str(out / "data")), "pid", _prompts(n)["pid"])
