"""AsyncLLMEngine on a real tiny checkpoint: streamed outputs are cumulative and end with the same result as a
final-only request; leaving the iteration aborts the request and frees its blocks; many concurrent callers."""

from __future__ import annotations

import asyncio
import time

import pytest

import glm4
from glm4 import SamplingParams
from glm4.tools.make_checkpoint import make_checkpoint

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("async") / "tiny", "tiny", seed=5, dtype="float32")
    eng = glm4.AsyncLLMEngine.from_pretrained(ckpt, block_size=8, max_num_seqs=16)
    yield eng
    eng.shutdown()


def _idle(engine: glm4.AsyncLLMEngine, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_streams"] == 0:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.02)


async def _collect(engine, ids, final_only, rid=None):
    return [out async for out in engine.generate(ids, PARAMS, request_id=rid, final_only=final_only)]


def test_streaming_and_final_only_agree(engine):
    async def main():
        prompts = [[5, 6, 7], [9] * 20, [11, 12]]
        streamed = await asyncio.gather(*(_collect(engine, p, False) for p in prompts))
        finals = await asyncio.gather(*(_collect(engine, p, True) for p in prompts))
        return streamed, finals

    streamed, finals = asyncio.run(main())
    for outs, (final,) in zip(streamed, finals):
        assert len(outs) == PARAMS.max_tokens  # one output per generated token, the last one finished
        assert [len(o.token_ids) for o in outs] == list(range(1, PARAMS.max_tokens + 1))
        assert [o.finished for o in outs] == [False] * (PARAMS.max_tokens - 1) + [True]
        assert final.finished and final.token_ids == outs[-1].token_ids and final.text == outs[-1].text
        assert final.arrival_time <= final.first_token_time
    _idle(engine)


def test_leaving_the_iteration_aborts_and_frees_blocks(engine):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        got = 0
        async for _ in engine.generate([5, 6, 7], long, request_id="leaver"):
            got += 1
            if got == 3:
                break
        return got

    before = _idle(engine)
    assert asyncio.run(main()) == 3
    after = _idle(engine)
    assert after["kv_blocks_free"] == after["kv_blocks_total"]
    assert after["num_generated_tokens"] - before["num_generated_tokens"] < 200


def test_duplicate_request_id_is_refused(engine):
    async def main():
        first = engine.generate([5, 6], PARAMS, request_id="dup")
        await first.__anext__()
        with pytest.raises(ValueError, match="already running"):
            await engine.generate([5, 6], PARAMS, request_id="dup").__anext__()
        await first.aclose()

    asyncio.run(main())
    _idle(engine)


def test_a_caller_whose_event_loop_closed_is_aborted_not_fatal(engine):
    """A caller that drives its own event loop and closes it mid-request (no `aclose`, so the generator's cleanup
    never runs) must not kill the engine loop: its request is aborted and the others go on."""
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    loop = asyncio.new_event_loop()
    gen = engine.generate([5, 6, 7], long, request_id="orphan")
    loop.run_until_complete(gen.__anext__())
    loop.close()
    s = _idle(engine)
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and not engine.is_dead
    (out,) = asyncio.run(_collect(engine, [5, 6, 7], True))  # still serving
    assert out.finished and len(out.token_ids) == PARAMS.max_tokens
    del gen
