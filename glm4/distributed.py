"""Tensor-parallel process groups and the collectives the ranks exchange control data with.

`init_tp_group` joins a group (NCCL on CUDA for the model's collectives, plus a private gloo group for CPU-side
control data on every backend); `broadcast` and `all_reduce_min` run on a group with an explicit per-operation
timeout, so a silent peer fails the call instead of blocking it forever. What the ranks send each other (the step
protocol) and how they are launched and supervised is glm4/engine/tp_executor.py's.

On CPU the groups are private gloo objects, so one process may hold several groups (one after another or at
once). NCCL uses torch.distributed's default group, so on GPU a process takes part in one group at a time.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["TPGroup", "RendezvousError", "get_free_port", "init_tp_group", "destroy_tp_group", "broadcast",
           "all_reduce_min"]

_ARRIVED_KEY = "glm4_tp/arrived"


class RendezvousError(RuntimeError):
    """The ranks of a group did not all arrive (in time, or before the caller gave up)."""


def _td(seconds: float | timedelta) -> timedelta:
    return seconds if isinstance(seconds, timedelta) else timedelta(seconds=float(seconds))


def get_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class TPGroup:
    """One rank's view of its tensor-parallel group."""

    rank: int
    world_size: int
    group: Any  # model collectives: pass as tp_group to load_model / ModelRunner
    control: Any  # gloo group for step inputs and start-up values (CPU tensors)
    backend: str
    timeout: timedelta  # bound on one collective
    store: Any = None  # rank 0 hosts the rendezvous store: keep it alive with the group


def init_tp_group(rank: int, world_size: int, master_addr: str, master_port: int, backend: str | None = None,
                  timeout: float | timedelta = 30.0, *, device: str | torch.device | None = None,
                  rendezvous_timeout: float | timedelta | None = None,
                  should_abort: Callable[[], bool] | None = None) -> TPGroup:
    """Join (rank 0: host) the group at tcp://master_addr:master_port.

    backend: None -> "nccl" when `device` is CUDA (or, without a device, when CUDA is available), else "gloo".
    timeout: bound on each collective afterwards. rendezvous_timeout: how long to wait for all ranks to arrive
    (processes start and import torch at different speeds; default max(timeout, 300 s)). should_abort: polled
    while waiting, so the caller can give up early (e.g. when a worker died during start-up).

    gloo groups are private objects (no torch.distributed global state), so a process can hold several groups,
    one after another or at once. NCCL uses torch.distributed's default group: one NCCL group per process.
    """
    dev = torch.device(device) if device is not None else None
    if backend is None:
        on_cuda = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
        backend = "nccl" if on_cuda else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        if dev is None or dev.type != "cuda":
            raise ValueError(f"NCCL needs each rank's CUDA device, got device={device!r}")
        if dist.is_initialized():
            raise RuntimeError("this process already has a torch.distributed default group; a process takes part "
                               "in one NCCL tensor-parallel group at a time (shut the previous executor down)")
    op_timeout = _td(timeout)
    rdv_timeout = _td(rendezvous_timeout) if rendezvous_timeout is not None else max(op_timeout, timedelta(
        seconds=300))
    store = dist.TCPStore(master_addr, int(master_port), world_size, is_master=(rank == 0), timeout=rdv_timeout,
                          wait_for_workers=False)
    # Barrier on the store first: creating a process group connects every pair and waits only `timeout` for
    # the peers, which may still be importing torch.
    store.add(_ARRIVED_KEY, 1)
    deadline = time.monotonic() + rdv_timeout.total_seconds()
    while store.add(_ARRIVED_KEY, 0) < world_size:
        if should_abort is not None and should_abort():
            raise RendezvousError("tensor-parallel start-up aborted while waiting for the other ranks")
        if time.monotonic() > deadline:
            raise RendezvousError(f"rank {rank}: only {store.add(_ARRIVED_KEY, 0)}/{world_size} ranks reached "
                                  f"{master_addr}:{master_port} within {rdv_timeout.total_seconds():.0f} s")
        time.sleep(0.02)
    control = dist.ProcessGroupGloo(dist.PrefixStore("glm4_tp/gloo/", store), rank, world_size, op_timeout)
    if backend == "gloo":
        group = control
    else:
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", store=dist.PrefixStore("glm4_tp/nccl/", store), rank=rank,
                                world_size=world_size, timeout=op_timeout, device_id=dev)
        group = dist.group.WORLD
    return TPGroup(rank, world_size, group, control, backend, op_timeout, store)


def destroy_tp_group(tp: TPGroup | None, *, abort: bool = False) -> None:
    """Tear down a group. abort=True (after a failure) skips any graceful NCCL shutdown."""
    if tp is None:
        return
    try:
        if tp.backend == "nccl" and dist.is_initialized():
            if abort:
                from torch.distributed.distributed_c10d import _abort_process_group

                _abort_process_group()
            else:
                dist.destroy_process_group()
        if not abort and hasattr(tp.control, "shutdown"):
            tp.control.shutdown()
    except Exception:  # noqa: BLE001 - the group is being thrown away; never mask the real error
        logger.warning("destroying the tensor-parallel group failed", exc_info=True)
    tp.store = None


# ---- collectives with an explicit per-operation timeout ----------------------------------------------------------
def broadcast(t: torch.Tensor, group: dist.ProcessGroup, timeout: timedelta) -> None:
    """Rank 0's `t` into every rank's `t` (in place)."""
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, timeout
    group.broadcast([t], opts).wait()


def all_reduce_min(t: torch.Tensor, group: dist.ProcessGroup, timeout: timedelta) -> None:
    """The element-wise minimum over the ranks, in place on every rank."""
    opts = dist.AllreduceOptions()
    opts.reduceOp, opts.timeout = dist.ReduceOp.MIN, timeout
    group.allreduce([t], opts).wait()

