"""Faults during a batch job: the driver killed with SIGKILL, an engine replica killed, the object store going
away. After each, the final output holds every input id exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.batch import run_batch
from pipeline.io import StorageError

from .conftest import engine_actor_pids, write_prompts
from .test_batch_e2e import assert_exactly_once, make_config, read_output

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
# Slow enough to be interrupted part-way: many small files, one replica, one batch at a time.
SLOW = dict(num_replicas=1, batch_size=2, batches_in_flight=1, rows_per_file=2, read_rows_per_task=4,
            sampling={"max_tokens": 24}, prefix_aware=False)


def _committed(paths: list[str]) -> list[str]:
    return [p for p in paths if p.endswith(".parquet") and not p.endswith(".pending.parquet")]


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _prompts(n: int) -> dict:
    return {"pid": [f"row-{i:03d}" for i in range(n)], "prompt": [f"prompt {i} " * (1 + i % 3) for i in range(n)]}


def test_driver_sigkill_then_rerun_resumes_exactly_once(ray_cluster, model_dir, tmp_path):
    n = 40
    write_prompts(tmp_path / "in.parquet", _prompts(n))
    out, ckpt = tmp_path / "out", tmp_path / "out" / "_checkpoint"
    argv = [sys.executable, "-m", "jobs.batch", "--model", str(model_dir), "--input", str(tmp_path / "in.parquet"),
            "--output", str(out), "--prompt-column", "prompt", "--id-column", "pid", "--max-tokens", "24",
            "--num-replicas", "1", "--replica-num-cpus", "0.5", "--batch-size", "2", "--batches-in-flight", "1",
            "--rows-per-file", "2", "--read-rows-per-task", "4", "--no-prefix-aware", "--device", "cpu",
            "--model-cache-dir", str(tmp_path / "cache"), "--ray-address", ray_cluster, "--summary-json"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for(lambda: len(_committed([str(p) for p in ckpt.glob("*")])) >= 2, 240, "two committed files", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "_SUCCESS").exists(), "the job finished before it could be interrupted"
    partial = read_output(str(out / "data"))
    assert 0 < len(partial) < n

    # The same command again resumes and completes.
    rerun = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and summary["rows_resumed"] >= 2
    assert_exactly_once(read_output(str(out / "data")), "pid", _prompts(n)["pid"])
    assert (out / "_SUCCESS").exists()


def test_killed_replica_is_replaced_without_loss_or_duplicates(ray_cluster, model_dir, tmp_path):
    n = 40
    write_prompts(tmp_path / "in.parquet", _prompts(n))
    cfg = make_config(tmp_path, input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"),
                      model=str(model_dir), prompt_column="prompt", id_column="pid", **SLOW)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run_batch(cfg, progress=None)), daemon=True)
    job.start()
    data = tmp_path / "out" / "data"
    _wait_for(lambda: engine_actor_pids() and len(list(data.glob("*.parquet"))) >= 2, 240,
              "the replica to be writing results")
    victims = engine_actor_pids()
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    job.join(300)
    assert not job.is_alive()
    summary = result["summary"]
    assert summary["status"] == "succeeded", summary
    assert_exactly_once(read_output(str(data)), "pid", _prompts(n)["pid"])


def test_object_store_outage_fails_cleanly_and_rerun_completes(ray_cluster, model_dir, tmp_path, moto_s3, s3,
                                                               s3_endpoint, bucket):
    proxy, _ = moto_s3
    n = 40
    write_prompts(f"{bucket}/in/prompts.parquet", _prompts(n), fs=s3)
    cfg = make_config(tmp_path, input=f"s3://{bucket}/in/", output=f"s3://{bucket}/out", model=str(model_dir),
                      prompt_column="prompt", id_column="pid",
                      storage={"endpoint_url": s3_endpoint, "connect_timeout_s": 2, "read_timeout_s": 10,
                               "max_attempts": 2}, **SLOW)
    result: dict = {}

    def job():
        try:
            result["summary"] = run_batch(cfg, progress=None)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            result["error"] = e

    t = threading.Thread(target=job, daemon=True)
    t.start()
    try:
        _wait_for(lambda: len(_committed(s3.find(f"{bucket}/out/_checkpoint"))) >= 2, 240, "committed files")
        proxy.stop()
        t0 = time.time()
        t.join(240)
        assert not t.is_alive(), "the job hung while the store was down"
        failed_after = time.time() - t0
    finally:
        proxy.stop()
        proxy.start()
    err = result.get("error")
    assert isinstance(err, StorageError), f"expected a StorageError, got {result}"
    assert "no _SUCCESS was written, rerun the same job to resume" in str(err)
    assert failed_after < 200
    assert not s3.exists(f"{bucket}/out/_SUCCESS")

    summary = run_batch(cfg, progress=None)
    assert summary["status"] == "succeeded" and summary["rows_resumed"] >= 2, summary
    assert_exactly_once(read_output(f"{bucket}/out/data", s3), "pid", _prompts(n)["pid"])
    assert s3.exists(f"{bucket}/out/_SUCCESS")


def test_half_committed_checkpoint_keeps_its_rows(ray_cluster, model_dir, tmp_path):
    """Regression: an outage between the copy and the delete of the checkpoint commit (a rename on object storage)
    leaves X.pending.parquet next to X.parquet. Ray's recovery alone would delete X's data file but keep X's ids
    as done, losing those rows for good."""
    n = 12
    write_prompts(tmp_path / "in.parquet", _prompts(n))
    out = tmp_path / "out"
    cfg = make_config(tmp_path, input=str(tmp_path / "in.parquet"), output=str(out), model=str(model_dir),
                      prompt_column="prompt", id_column="pid", keep_checkpoint=True, rows_per_file=4)
    assert run_batch(cfg, progress=None)["status"] == "succeeded"
    (out / "_SUCCESS").unlink()  # as if the driver died right after the write
    committed = sorted(p for p in (out / "_checkpoint").glob("*.parquet"))
    assert len(committed) >= 2
    victim = committed[0]
    (victim.parent / (victim.name[: -len(".parquet")] + ".pending.parquet")).write_bytes(victim.read_bytes())
    summary = run_batch(cfg, progress=None)
    assert summary["status"] == "succeeded", summary
    assert_exactly_once(read_output(str(out / "data")), "pid", _prompts(n)["pid"])
