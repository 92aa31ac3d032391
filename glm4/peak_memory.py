"""Peak memory of a block of code on the device it runs on: the working-memory measure of the profile run that sizes
the KV cache (glm4/engine/memory_profile.py), of the long-context tests and of bench/engine.py (c).

CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`) above what was allocated at the start.
CPU: the CPU allocator keeps no peak counter, so the torch profiler records every tensor allocation and free in the
block and the peak is their running sum, in time order. That reads `profiler.kineto_results` (semi-private; pinned
by tests/engine/test_memory_profile.py, which fails loudly if a torch upgrade changes it). It counts torch tensors
exactly, where the process's peak RSS would miss memory glibc reuses and count unrelated allocations.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak_bytes`: the most memory the block's tensors held at once
    beyond what was allocated when it started."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._base = 0
        self._prof: profile | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        assert self._prof is not None
        self._prof.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        live = 0
        for _, nbytes in events:
            live += nbytes
            self.peak_bytes = max(self.peak_bytes, live)
