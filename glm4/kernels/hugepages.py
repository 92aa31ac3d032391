"""Weights in transparent huge pages (2 MiB) on Linux.

Why: decode streams every weight once per step, and with 4 KiB pages a 310 MB matrix spans ~76k pages, so the
read stalls on TLB misses (worse in a VM, where each miss walks two page tables). On the project's machine a plain
`sum` over such a tensor reads ~25-30% faster from huge pages. PyTorch only asks for huge pages when
THP_MEM_ALLOC_ENABLE=1 is set before it starts; this module asks for them per tensor with madvise(MADV_HUGEPAGE)
before the memory is first touched. Where THP is off ("never") or on other systems the copy is plain memory.
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
