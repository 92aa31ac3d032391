"""Bounded admission, 429 at once: each replica admits ``max_ongoing_requests`` requests into the engine and lets
at most ``max_queued_requests`` more wait; past that a request gets 429 with ``Retry-After`` and OpenAI's error
body straight away (no waiting, no timeout), instead of piling up in a queue nobody bounds.
"""

from __future__ import annotations

import asyncio
import math

from pipeline.serve.protocol import APIError


class Overloaded(APIError):
    def __init__(self, retry_after_s: float, ongoing: int, queued: int):
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(429, f"server overloaded: {ongoing} requests running and {queued} queued on this "
                              f"replica; retry after {seconds}s", type="rate_limit_error",
                         code="server_overloaded", headers={"Retry-After": str(seconds)})


class Admission:
    """At most ``max_ongoing`` holders at once, at most ``max_queued`` waiters; anyone past that is refused
    immediately (no waiting, no timeout)."""

    def __init__(self, max_ongoing: int, max_queued: int, retry_after_s: float):
        self.max_ongoing = max_ongoing
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.ongoing = 0
        self.queued = 0
        self.rejected = 0
        # High-water marks: the bound itself, observable (tests assert it under bursts whatever the timing).
        self.peak_ongoing = 0
        self.peak_queued = 0
        self._sem: asyncio.Semaphore | None = None

    async def acquire(self) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_ongoing)
        if self._sem.locked():
            if self.queued >= self.max_queued:
                self.rejected += 1
                raise Overloaded(self.retry_after_s, self.ongoing, self.queued)
            self.queued += 1
            self.peak_queued = max(self.peak_queued, self.queued)
            try:
                await self._sem.acquire()
            finally:
                self.queued -= 1
        else:
            await self._sem.acquire()  # free slot: returns without suspending
        self.ongoing += 1
        self.peak_ongoing = max(self.peak_ongoing, self.ongoing)

    def release(self) -> None:
        assert self._sem is not None
        self.ongoing -= 1
        self._sem.release()
