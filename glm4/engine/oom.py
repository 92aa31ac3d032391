"""Out-of-memory errors inside an engine step: which ones the engine survives, and what the requests are told.

A step that runs out of memory (CUDA's `torch.OutOfMemoryError`, or the CPU allocator's RuntimeError) has left
nothing behind that later steps depend on: the scheduler registers computed blocks in the prefix cache only after
a step succeeded, and the step's tensors are freed when the exception is. So the engine fails the requests of that
step and goes on. Not survivable: the same error text inside a `TensorParallelError` (a worker rank died of it; the
group is gone).
"""

from __future__ import annotations

import torch

from glm4.engine.executor import TensorParallelError

# What c10's DefaultCPUAllocator raises (as a plain RuntimeError) when malloc fails, in current and older torch.
_CPU_OOM_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")
_MAX_CAUSE_CHARS = 300


def is_recoverable_oom(e: BaseException) -> bool:
    """True for an out-of-memory error raised in this process by a step's forward or sampling."""
    if isinstance(e, TensorParallelError):
        return False
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _CPU_OOM_MESSAGES)


def oom_message(e: BaseException, num_tokens: int, num_seqs: int) -> str:
    """The error each request of the failed step gets: the step's size, the cause, and what to lower."""
    lines = str(e).strip().splitlines()
    cause = lines[0] if lines else type(e).__name__
    if len(cause) > _MAX_CAUSE_CHARS:
        cause = cause[:_MAX_CAUSE_CHARS] + "..."
    return (f"out of memory in a step of {num_tokens} tokens / {num_seqs} sequences: {cause}; lower "
            "max_num_batched_tokens or max_num_seqs or the KV cache fraction (kv_cache_memory)")


def release_cached_memory(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back after an OOM, so fragmentation does not fail the next step."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
