"""Weights in transparent huge pages (2 MiB) on Linux.

Why: decode streams every weight once per step, and with 4 KiB pages a 310 MB matrix spans ~76k pages, so the
read stalls on TLB misses (worse in a VM, where each miss walks two page tables). On the project's machine a plain
`sum` over such a tensor reads ~25-30% faster from huge pages. PyTorch only asks for huge pages when
THP_MEM_ALLOC_ENABLE=1 is set before it starts; this module asks for them per tensor with madvise(MADV_HUGEPAGE)
before the memory is first touched. Where THP is off ("never") or on other systems the copy is plain memory.

`Arena` goes one step further for a model's weights: one huge-page allocation holding them back to back, in the
order a decode step reads them. Separately allocated, the 1-6 MB matrices of a small model's layers are each a
short stream (most of them under 2 MiB, so on 4 KiB pages too), and a `sum` over them reads at ~60-70% of the
machine's bandwidth; laid end to end in one arena, at ~80-90% (bench/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_libc = None


def _madvise() -> "ctypes._CFuncPtr | None":
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose bytes lie in huge-page-advised memory (plain memory under 2 MiB)."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    madvise = _madvise()
    if madvise is None or nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    # Large allocations are fresh mmaps whose pages are not yet faulted in, so advising the aligned interior
    # before the copy makes the kernel back it with huge pages on first touch.
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = buf.data_ptr()
    offset = -start % HUGE_PAGE
    madvise(start + offset, nbytes - nbytes % HUGE_PAGE, _MADV_HUGEPAGE)  # best effort: ignore EINVAL etc.
    return buf[offset:offset + nbytes].view(dtype).view(shape)


def copy_to_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor `t` in huge-page-advised memory."""
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    return out


class Arena:
    """One huge-page allocation of `nbytes`, handed out front to back by `take`. The pages are faulted in as they
    are first written, so copying weights in one by one (and dropping each original) never holds two copies of
    the model."""

    ALIGN = 64  # a cache line: every tensor starts on one (and so does every AVX-512 load of a row start)

    def __init__(self, nbytes: int) -> None:
        self.buffer = empty((max(nbytes, 1),), torch.uint8)
        self.offset = 0

    @classmethod
    def size_for(cls, tensors: list[torch.Tensor]) -> int:
        """Bytes an arena needs to `take` all of `tensors`."""
        return sum(-(-t.numel() * t.element_size() // cls.ALIGN) * cls.ALIGN for t in tensors)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of `t` in the next free bytes of the arena."""
        nbytes = t.numel() * t.element_size()
        end = self.offset + nbytes
        if end > self.buffer.numel():
            raise ValueError(f"arena of {self.buffer.numel():,} bytes is full: {nbytes:,} more requested at "
                             f"{self.offset:,}")
        out = self.buffer[self.offset:end].view(t.dtype).view(t.shape)
        out.copy_(t)
        self.offset += -(-nbytes // self.ALIGN) * self.ALIGN
        return out
