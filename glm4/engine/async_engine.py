"""AsyncLLMEngine: the engine for online serving. One background thread steps the engine; asyncio callers
add requests, stream incremental outputs and abort.

    engine = AsyncLLMEngine.from_pretrained(model_dir, max_num_seqs=64)
    async for out in engine.generate(prompt_token_ids, SamplingParams(max_tokens=32), request_id="r1"):
        print(out.outputs[0].text)          # cumulative text so far
    await engine.abort("r1")                # or just stop iterating: the request is aborted for you
    # generate(..., final_only=True) yields one output, when the request finishes (batch rows, non-streaming
    # HTTP): no per-step copy, cross-thread hand-off and wake-up per request

Only the loop thread touches the scheduler: `add`/`abort` are queued as commands and applied at the start of
the next iteration, so no lock is held while the model runs. Torch releases the GIL inside its kernels, so the
asyncio event loop keeps serving HTTP while a step runs. If a step raises (a dead tensor-parallel worker), every
waiting caller gets `EngineDeadError` and later calls fail fast with the same cause. An out-of-memory error is not
such a failure: `LLMEngine.step` finishes the requests of that step with the error and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from glm4.engine.engine_config import EngineConfig
from glm4.engine.llm_engine import LLMEngine
from glm4.engine.outputs import RequestOutput
from glm4.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an unrecoverable error; create a new engine."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats: dict[str, Any] = engine.stats()
        self._dead: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="glm4-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **options: Any) -> "AsyncLLMEngine":
        return cls(LLMEngine(model_dir, EngineConfig.from_kwargs(**options)))

    # ---- public API ------------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, final_only: bool = False) -> AsyncIterator[RequestOutput]:
        """Yield incremental RequestOutputs (cumulative text/tokens) until the request finishes, or with
        `final_only` just the finished one. Leaving the iteration early (client gone, task cancelled) aborts the
        request and frees its KV blocks."""
        self._raise_if_dead()
        rid = request_id or uuid.uuid4().hex
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already running")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", rid, list(prompt_token_ids), params or SamplingParams(), final_only))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine stopped: {item!r}") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._commands.put(("abort", rid))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        """Latest engine statistics (updated by the loop after every step; safe to call from any thread)."""
        return dict(self._stats, num_streams=len(self._streams), dead=self._dead is not None)

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def check_health(self) -> None:
        self._raise_if_dead()
        self.engine.check_health()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self.engine.shutdown()

    # ---- loop thread -----------------------------------------------------------------------------------
    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, final_only = cmd
                if rid in self._streams:  # the caller may already have gone
                    self.engine.add_request(rid, ids, params, final_only=final_only)
            else:
                self.engine.abort(cmd[1])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        # One hand-off per event loop per step, not one per request: each call_soon_threadsafe wakes the loop
        # through its self-pipe (a syscall), and a Serve replica streams dozens of requests on one loop.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                loop, q = target
                by_loop.setdefault(loop, []).append((q, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the callers' event loop is closed: nobody is left to read, stop their requests
                for _, out in items:
                    self._streams.pop(out.request_id, None)
                    if not out.finished:
                        self.engine.abort(out.request_id)

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._apply_commands()
                if not self.engine.has_unfinished():
                    self._stats = self.engine.stats()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._deliver(self.engine.step())
                self._stats = self.engine.stats()
            except BaseException as e:  # noqa: BLE001 - anything here means the engine cannot go on
                logger.exception("engine loop died")
                self._dead = e
                for loop, q in list(self._streams.values()):
                    try:
                        loop.call_soon_threadsafe(q.put_nowait, e)
                    except RuntimeError:  # that caller's event loop is closed
                        pass
                return


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
