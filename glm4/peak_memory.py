"""Peak memory of a block of code, on the device it runs on: the working-memory measure of tests and benchmarks.

CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`) since the block started.
CPU: the process's peak resident set (`VmHWM` in /proc/self/status), reset at the start of the block by writing
"5" to /proc/self/clear_refs (Linux >= 4.0). Tensors freed before the block are given back to the OS by glibc
for large allocations, so the peak above the block's starting RSS is what the block itself held.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def cpu_supported() -> bool:
    try:
        _status_kib("VmHWM")
        return Path("/proc/self/clear_refs").exists()
    except (OSError, RuntimeError):
        return False


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak_bytes`: memory held at the peak of the block beyond what
    was held when it started."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._start = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            self._start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.peak_bytes = max(0, _status_kib("VmHWM") * 1024 - self._start)
