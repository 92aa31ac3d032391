"""Executor level: MultiprocExecutor and RayExecutor at tp=2 return the same logits as UniProcExecutor for the
same StepInputs sequence (whole prefill, chunked prefill, decodes), and shut down without leaving anything."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from glm4.engine.executor import ExecutorSpec, TensorParallelError, UniProcExecutor

from .helpers import build_steps, pid_gone, wait_pids_gone

pytestmark = pytest.mark.slow
BLOCK = 4
TIMEOUT_S = 10.0


def _spec(path, tp: int, **kw) -> ExecutorSpec:
    return ExecutorSpec(model_dir=str(path), dtype="float32", device="cpu", tensor_parallel_size=tp,
                        block_size=BLOCK, kv_cache_memory=None, max_blocks_needed=64,
                        worker_timeout_s=TIMEOUT_S, startup_timeout_s=180.0, **kw)


@pytest.fixture(scope="module")
def steps():
    return build_steps(vocab_size=272, block_size=BLOCK)


@pytest.fixture(scope="module")
def reference(tp_checkpoints, steps):
    ex = UniProcExecutor(_spec(tp_checkpoints["chatglm"], 1))
    try:
        return [ex.execute(s) for s in steps]
    finally:
        ex.shutdown()


def _check_parity(ex, steps, reference):
    assert ex.num_blocks == 64 and ex.block_size == BLOCK
    for i, (s, ref) in enumerate(zip(steps, reference)):
        got = ex.execute(s)
        assert got.shape == ref.shape and got.dtype == torch.float32
        diff = (got - ref).abs().max().item()
        assert diff <= 1e-5, f"step {i}: max |logit diff| {diff:.3g}"
    ex.check_health()


def test_multiproc_tp2_matches_uniproc(tp_checkpoints, steps, reference):
    from glm4.engine.tp_executor import MultiprocExecutor

    ex = MultiprocExecutor(_spec(tp_checkpoints["chatglm"], 2))
    procs = ex.worker_processes
    try:
        _check_parity(ex, steps, reference)
    finally:
        t0 = time.monotonic()
        ex.shutdown()
    assert time.monotonic() - t0 < 15
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]  # clean SHUTDOWN, not killed
    assert not dist.is_initialized()
    ex.shutdown()  # idempotent
    with pytest.raises(TensorParallelError):
        ex.execute(steps[0])


@pytest.mark.ray
def test_ray_tp2_matches_uniproc(ray_local, tp_checkpoints, steps, reference):
    from pipeline.tp_ray import RayExecutor

    before = ray_local.available_resources().get("CPU", 0)
    ex = RayExecutor.with_options(num_cpus_per_rank=0.25)(_spec(tp_checkpoints["chatglm"], 2))
    pids = ex.worker_pids
    try:
        pg = ex.placement_group
        table = ray_local.util.placement_group_table(pg)
        assert table["strategy"] == "STRICT_PACK" and len(table["bundles"]) == 2
        assert all(b.get("CPU") == 0.25 for b in table["bundles"].values())
        _check_parity(ex, steps, reference)
    finally:
        ex.shutdown()
    assert not wait_pids_gone(pids)
    assert not dist.is_initialized()
    assert ray_local.util.placement_group_table(pg)["state"] == "REMOVED"
    deadline = time.monotonic() + 10
    while ray_local.available_resources().get("CPU", 0) < before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_local.available_resources().get("CPU", 0) >= before


@pytest.mark.reliability
def test_silent_worker_raises_within_the_timeout(tp_checkpoints, steps):
    """A worker that is alive but stops answering (SIGSTOP) fails the step after worker_timeout_s, not never."""
    from glm4.engine.tp_executor import MultiprocExecutor

    timeout = 3.0
    ex = MultiprocExecutor(dataclasses.replace(_spec(tp_checkpoints["chatglm"], 2), worker_timeout_s=timeout))
    pid = ex.worker_pids[0]
    try:
        ex.execute(steps[0])
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match="stopped answering"):
            ex.execute(steps[1])
        elapsed = time.monotonic() - t0
        assert timeout * 0.8 < elapsed < timeout + 5, elapsed
        assert not wait_pids_gone([pid], timeout=10), "the silent worker was not killed"
    finally:
        ex.shutdown()
        if not pid_gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_startup_failure_raises_and_cleans_up(tmp_path):
    """A rank that cannot load (here: no checkpoint at all) fails start-up with the named error, no hang."""
    from glm4.engine.tp_executor import MultiprocExecutor

    (tmp_path / "config.json").write_text("{}")
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError):
        MultiprocExecutor(_spec(tmp_path, 2))
    assert time.monotonic() - t0 < 60
    assert not dist.is_initialized()


_ORPHAN_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from glm4.engine.tp_executor import MultiprocExecutor
    from glm4.engine.executor import ExecutorSpec
    if __name__ == "__main__":
        ex = MultiprocExecutor(ExecutorSpec({ckpt!r}, "float32", "cpu", 2, 4, None, 64, worker_timeout_s=10.0,
                                            startup_timeout_s=180.0))
        print(ex.worker_pids[0], flush=True)
        time.sleep(600)
""")


def test_workers_die_with_their_parent(tp_checkpoints, tmp_path):
    """SIGKILL the process that owns rank 0: its worker processes exit by themselves (parent watchdog)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "owner.py"
    script.write_text(_ORPHAN_SCRIPT.format(repo=repo, ckpt=str(tp_checkpoints["chatglm"])))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()
        assert line.strip().isdigit(), f"owner did not start its group: {line!r}"
        worker = int(line)
        assert not pid_gone(worker)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        assert not wait_pids_gone([worker], timeout=10), "worker survived its parent"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
