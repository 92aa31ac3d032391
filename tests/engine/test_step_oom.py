"""An out-of-memory error inside a step fails the requests of that step only: they finish with finish_reason
"error" and a message naming the cause, their KV blocks are freed, waiting requests run in later steps, and the
engine (sync or async) keeps serving."""

from __future__ import annotations

import asyncio

import pytest
import torch

import glm4
from glm4 import SamplingParams
from glm4.engine.executor import TensorParallelError
from glm4.engine.oom import is_recoverable_oom
from glm4.tools.make_checkpoint import make_checkpoint

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = {"a": [5, 6, 7, 8], "b": [9] * 11, "c": [11, 12, 13]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("oom") / "tiny", "tiny", seed=7, dtype="float32")


def _cuda_oom() -> None:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")


def _cpu_oom() -> None:
    torch.empty(2**60, dtype=torch.uint8)  # a real allocation failure of the CPU allocator


class FailOnce:
    """Wraps a callable; the `at`-th call runs `fail` first (which must raise). Records that it did raise."""

    def __init__(self, fn, fail, at: int = 1) -> None:
        self.fn, self.fail, self.at = fn, fail, at
        self.calls, self.raised = 0, None

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            try:
                self.fail()
            except BaseException as e:
                self.raised = e
                raise
        return self.fn(*args, **kwargs)


def _run_to_completion(engine, limit: int = 200) -> dict:
    finals = {}
    for _ in range(limit):
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if not engine.has_unfinished():
            return finals
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize("where,fail", [("executor", _cuda_oom), ("executor", _cpu_oom), ("sampler", _cuda_oom)])
def test_oom_fails_that_steps_requests_and_the_engine_goes_on(ckpt, where, fail):
    engine = glm4.LLMEngine.from_pretrained(ckpt, block_size=8, max_num_seqs=2, max_num_batched_tokens=64)
    # reference: what "c" generates when nothing goes wrong
    engine.add_request("ref", PROMPTS["c"], PARAMS)
    reference = _run_to_completion(engine)["ref"].token_ids
    total = engine.stats()["kv_blocks_total"]

    for rid, ids in PROMPTS.items():  # max_num_seqs=2: "c" waits while "a" and "b" run
        engine.add_request(rid, ids, PARAMS)
    first = {o.request_id: o for o in engine.step()}  # prefill of a and b
    assert set(first) == {"a", "b"} and engine.stats()["num_waiting"] == 1
    if where == "executor":
        injected = engine.executor.execute = FailOnce(engine.executor.execute, fail)
    else:
        injected = engine.sampler = FailOnce(engine.sampler, fail)

    failed = engine.step()  # decode of a and b: out of memory
    assert is_recoverable_oom(injected.raised), injected.raised
    assert {o.request_id for o in failed} == {"a", "b"}
    for out in failed:
        assert out.finished and out.finish_reason == "error"
        assert out.error.startswith("out of memory in a step of 2 tokens / 2 sequences: "), out.error
        assert "max_num_batched_tokens" in out.error
    assert engine.stats()["num_running"] == 0

    finals = _run_to_completion(engine)  # the waiting request runs, unaffected
    assert set(finals) == {"c"} and finals["c"].finish_reason == "length"
    assert finals["c"].token_ids == reference
    engine.add_request("later", PROMPTS["a"], PARAMS)  # and new ones are served
    assert _run_to_completion(engine)["later"].finish_reason == "length"
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == total  # no block leaked
    assert injected.calls > 1
    engine.shutdown()


def test_other_step_errors_still_raise(ckpt):
    engine = glm4.LLMEngine.from_pretrained(ckpt, block_size=8, max_num_seqs=2)
    engine.add_request("a", PROMPTS["a"], PARAMS)

    def boom() -> None:
        raise RuntimeError("a bug, not memory")

    engine.executor.execute = FailOnce(engine.executor.execute, boom)
    with pytest.raises(RuntimeError, match="a bug"):
        engine.step()
    engine.shutdown()


def test_which_errors_count_as_recoverable_oom():
    assert is_recoverable_oom(torch.OutOfMemoryError("CUDA out of memory"))
    try:
        _cpu_oom()
    except RuntimeError as e:
        assert is_recoverable_oom(e)
    assert not is_recoverable_oom(RuntimeError("shape mismatch"))
    # a worker rank that died of it took the tensor-parallel group with it: that is not survivable
    assert not is_recoverable_oom(TensorParallelError("rank 1 exit code 1: RuntimeError: DefaultCPUAllocator: "
                                                      "can't allocate memory: you tried to allocate 8 bytes"))


def test_async_engine_survives_an_oom(ckpt):
    engine = glm4.AsyncLLMEngine.from_pretrained(ckpt, block_size=8, max_num_seqs=4)
    inner = engine.engine
    injected = FailOnce(inner.executor.execute, _cuda_oom)

    async def collect(ids, rid):
        return [o async for o in engine.generate(ids, PARAMS, request_id=rid)]

    async def main():
        inner.executor.execute = injected  # the loop thread reads the attribute at its next step
        return await collect(PROMPTS["a"], "a"), await collect(PROMPTS["c"], "c")

    try:
        first, second = asyncio.run(main())  # no EngineDeadError
        assert injected.raised is not None and not engine.is_dead
        assert len(first) == 1 and first[0].finish_reason == "error" and "out of memory" in first[0].error
        assert second[-1].finish_reason == "length" and len(second[-1].token_ids) == PARAMS.max_tokens
        stats = inner.stats()
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    finally:
        engine.shutdown()
