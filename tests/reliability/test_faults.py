"""Batch-job faults beyond tests/pipeline's (driver SIGKILL once, one replica kill, S3 stopped): a replica killed
twice in one job, a tensor-parallel worker killed, a finished output rerun with and without --overwrite, corrupt
input files, and a model cache that is full. The scenario code is bench/faults.py's (the bench runs them bigger and
repeated), with the default job settings except bench/faults.py's BASE / FAULT (each one explained there); each
test asserts the row it produces: the fault landed (a kill hit a process working on rows, the broken input or cache
was reported), nothing lost, nothing duplicated, and a clean finish or a clean, explained failure."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from .conftest import pipeline_helpers

pytestmark = [pytest.mark.reliability, pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(400)]

_BENCH = Path(__file__).resolve().parents[2] / "bench" / "faults.py"
_spec = importlib.util.spec_from_file_location("_glm4_bench_faults", _BENCH)
faults = importlib.util.module_from_spec(_spec)
sys.modules["_glm4_bench_faults"] = faults
_spec.loader.exec_module(faults)


class _Env:
    """bench/faults.py's Env on the session's Ray cluster and moto server (fixtures), not new ones."""

    def __init__(self, work: Path, model: Path, gcs: str, moto_s3, s3):
        self.work, self.model, self.gcs = work, Path(model), gcs
        self.proxy, direct = moto_s3
        self.endpoint = f"http://127.0.0.1:{self.proxy.port}"
        self.s3 = s3
        self._n = 0

    bucket = faults.Env.bucket


@pytest.fixture
def env(tmp_path, model_dir, ray_cluster, moto_s3, s3):
    return _Env(tmp_path, model_dir, ray_cluster, moto_s3, s3)


def _check(row, *, must_finish: bool = False):
    print(faults.table([row]))
    assert row.clean, row.cells()
    assert row.dup == 0, row.cells()
    if must_finish:
        assert row.lost == 0 and row.rows_out == row.rows_in, row.cells()


def test_finished_output_is_never_overwritten_without_the_flag(env):
    row = faults.finished_output(env, 12)
    _check(row, must_finish=True)


@pytest.mark.parametrize("kind", ["garbage", "bad-page"])
def test_corrupt_input_fails_cleanly_naming_the_file(env, kind):
    row = faults.corrupt_input(env, 12, kind)
    _check(row)
    assert "error names the file" in row.notes, row.notes


def test_model_cache_disk_full_fails_cleanly(env):
    row = faults.model_cache_broken(env, 4, "full")
    _check(row)
    assert not row.outcome.startswith("HUNG")
    assert row.outcome.startswith("failed") and "error says why" in row.notes, row.cells()


def test_replica_killed_twice_recovers_in_the_same_run(env):
    """Two distinct replica processes SIGKILLed while stepping with rows in flight (the second one is the first's
    replacement); a process started after the second kill generates the rest, in the same run."""
    row = faults.replica_killed_twice(env, 48)
    print("\n".join(row.notes))
    _check(row, must_finish=True)
    assert row.outcome.startswith("succeeded"), row.outcome


def test_tensor_parallel_worker_killed_recovers_in_the_same_run(env):
    """With the default engine restart budget (max_engine_restarts=3) a killed rank is recovered in the same run:
    the first run_batch call succeeds, no rerun."""
    row = faults.tp_worker_killed(env, 24)
    print("\n".join(row.notes))
    assert getattr(row, "tp_error_logged", False), "the replica's engine never raised TensorParallelError"
    assert row.landed, f"the kill did not land on a working TP group, or no replacement took over: {row.notes}"
    assert row.same_run, f"not recovered in the same run: {row.outcome}"
    _check(row, must_finish=True)
