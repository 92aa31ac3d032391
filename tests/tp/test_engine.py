"""Engine level: `glm4.LLM(..., tensor_parallel_size=N)` gives the same greedy tokens at tp=1/2/4 for both
checkpoint layouts and both launchers, and killing a worker mid-generation fails `generate` with
TensorParallelError within the bound, leaving no worker behind."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch.distributed as dist

import glm4
from glm4 import SamplingParams
from glm4.engine.executor import TensorParallelError

from .conftest import LAYOUTS
from .helpers import wait_pids_gone

pytestmark = pytest.mark.slow
TIMEOUT_S = 10.0
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=64, block_size=8, worker_timeout_s=TIMEOUT_S)
_kept: dict[str, glm4.LLM] = {}  # a live tp=4 engine per launcher, handed to the kill test


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(2, 100))] for _ in range(6)]


def _executor(launcher: str, tp: int):
    if launcher == "multiproc":
        return None  # the default for tp > 1
    from pipeline.tp_ray import RayExecutor

    # the string form once; small bundles elsewhere so other modules' actors still fit on 4 logical CPUs
    return "pipeline.tp_ray:RayExecutor" if tp == 2 else RayExecutor.with_options(num_cpus_per_rank=0.25)


def _llm(path, launcher: str, tp: int) -> glm4.LLM:
    return glm4.LLM(path, tensor_parallel_size=tp, executor=_executor(launcher, tp), **ENGINE)


@pytest.fixture(scope="module")
def reference(tp_checkpoints) -> dict[str, list[list[int]]]:
    out = {}
    for layout in LAYOUTS:
        with glm4.LLM(tp_checkpoints[layout], **ENGINE) as llm:
            out[layout] = [o.token_ids for o in llm.generate(_prompts(), GREEDY)]
    assert out["chatglm"] == out["glm"]  # same seed, same model: the layouts agree at tp=1 already
    return out


@pytest.fixture(scope="module", autouse=True)
def _close_kept():
    yield
    while _kept:
        _kept.popitem()[1].shutdown()


@pytest.mark.parametrize("launcher", ["multiproc", pytest.param("ray", marks=pytest.mark.ray)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_identical_across_tp(request, tp_checkpoints, reference, layout, launcher):
    if launcher == "ray":
        request.getfixturevalue("ray_local")
    for tp in (2, 4):
        llm = _llm(tp_checkpoints[layout], launcher, tp)
        keep = False
        try:
            got = [o.token_ids for o in llm.generate(_prompts(), GREEDY)]
            assert got == reference[layout], f"tp={tp} {launcher} {layout}"
            keep = tp == 4 and layout == LAYOUTS[-1]
            if keep:
                _kept[launcher] = llm
        finally:
            if not keep:
                llm.shutdown()


@pytest.mark.reliability
@pytest.mark.parametrize("launcher", ["multiproc", pytest.param("ray", marks=pytest.mark.ray)])
def test_killing_a_worker_mid_generation_raises_and_cleans_up(request, tp_checkpoints, launcher):
    if launcher == "ray":
        ray = request.getfixturevalue("ray_local")
    llm = _kept.pop(launcher, None) or _llm(tp_checkpoints[LAYOUTS[-1]], launcher, 4)
    ex = llm.engine.executor
    pids = list(ex.worker_pids)
    assert len(pids) == 3
    victim = pids[1]
    execute, calls, killed_at = ex.execute, [0], []

    def execute_then_kill(inputs):  # the 4th engine step finds rank 2 killed
        calls[0] += 1
        if calls[0] == 4:
            os.kill(victim, signal.SIGKILL)
            killed_at.append(time.monotonic())
        return execute(inputs)

    ex.execute = execute_then_kill
    try:
        with pytest.raises(TensorParallelError) as err:
            llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        elapsed = time.monotonic() - killed_at[0]
        assert elapsed < TIMEOUT_S, f"error took {elapsed:.1f} s"
        assert "rank 2" in str(err.value)
        # every worker is gone, the group is destroyed, the engine refuses further work with the same error
        assert not wait_pids_gone(pids, timeout=15), "worker processes left behind"
        assert not dist.is_initialized()
        with pytest.raises(TensorParallelError):
            llm.engine.check_health()
        with pytest.raises(TensorParallelError):
            llm.generate([[1, 2, 3]], GREEDY)
        if launcher == "ray":
            assert ray.util.placement_group_table(ex.placement_group)["state"] == "REMOVED"
    finally:
        llm.shutdown()
